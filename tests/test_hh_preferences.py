"""HH preference data: bad input errors, the pair cut to `hh_seq_len`, prompts that do not fit,
and the reward model and DPO on a slice of real Anthropic HH harmless-base pairs."""

import gzip
import json
import logging
import math
import os

import numpy as np
import pytest

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.rlhf import comparisons, tasks
from gptjax.rlhf.reward import RewardConfig

# Test data only (../shared beside the checkout, or GPTJAX_HH_SAMPLE); the product never reads it.
HH_SAMPLE = os.environ.get("GPTJAX_HH_SAMPLE") or os.path.join(
    os.path.dirname(__file__),
    "..",
    "..",
    "shared",
    "data",
    "hh-rlhf",
    "harmless-base-test.jsonl.gz",
)
TOK = ByteTokenizer()
GOOD = {
    "chosen": "\n\nHuman: hi\n\nAssistant: Hello!",
    "rejected": "\n\nHuman: hi\n\nAssistant: No.",
}


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _ids(*turns):
    """Byte ids of Human/Assistant turns written out by hand: eos closes each Assistant turn."""
    out = []
    for i, text in enumerate(turns):
        role = "Human" if i % 2 == 0 else "Assistant"
        out += list(f"\n\n{role}: {text}".encode()) + ([TOK.eos_id] if role == "Assistant" else [])
    return out


def _text(*turns):
    return "".join(f"\n\n{('Human', 'Assistant')[i % 2]}: {t}" for i, t in enumerate(turns))


# ----------------------------------------------------------------------------- bad input


def test_missing_field_names_file_and_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD, "", {"chosen": "\n\nHuman: a"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:3: expected an object with string 'chosen'"):
        comparisons.load_hh_jsonl(path)
    path = _write(tmp_path / "q.jsonl", [GOOD, [1, 2]])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: .*fix or remove the line"):
        comparisons.load_hh_jsonl(path)


def test_identical_sides_name_file_and_line(tmp_path):
    same = {"chosen": GOOD["chosen"], "rejected": GOOD["chosen"]}
    path = _write(tmp_path / "s.jsonl", [GOOD, GOOD, same])
    with pytest.raises(ValueError, match=r"s\.jsonl:3: 'chosen' and 'rejected' are the same text"):
        comparisons.load_hh_jsonl(path)
    assert len(comparisons.load_hh_jsonl(path, limit=2)) == 2  # rows past the limit are unread


def test_non_dialogue_names_file_line_and_side(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"chosen": GOOD["chosen"], "rejected": "plain text"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: 'rejected' is not a Human/Assistant"):
        comparisons.load_hh_jsonl(path)


def test_task_prompts_longer_than_the_context_raise_with_the_numbers():
    task = tasks.make_task()
    rm_cfg = RewardConfig(n_prompts=8, heldout_prompts=4, max_new_tokens=16, seed=0)
    prompts = tasks.prompts(task, 12, 0)
    width = max(len(comparisons.chat.prompt_ids(TOK, p)) for p in prompts)
    cfg = ModelConfig(n_layers=1, d_model=8, n_heads=1, vocab_size=TOK.vocab_size, max_len=width)
    want = (
        rf"task prompts of up to {width} tokens \+ RewardConfig.max_new_tokens=16 = {width + 16} "
        rf"exceed the policy's max_len {width}; set max_new_tokens <= 0 or start from a model"
    )
    with pytest.raises(ValueError, match=want):  # before any sampling: params are never read
        comparisons.comparison_data(cfg, None, TOK, task, rm_cfg, None)
    with pytest.raises(ValueError, match=want):
        comparisons.task_rankings(cfg, None, TOK, task, prompts, rm_cfg, None, width)
    comparisons.check_prompt_fits(cfg.replace(max_len=width + 16), width, 16)  # exactly fits


# ----------------------------------------------------------------------------- the cut


def test_pairs_that_fit_are_whole():
    pair = comparisons.encode_pair(TOK, _text("hi", "Hello!"), _text("hi", "No."), 64)
    assert pair == (_ids("hi", "Hello!"), _ids("hi", "No."))


def test_long_pairs_are_cut_at_one_start_keeping_the_shared_history_aligned():
    history = ("tell me a story about a long road", "Once upon a time.", "more")
    chosen, rejected = _ids(*history, "The end."), _ids(*history, "No, I will not go on.")
    seq_len = len(rejected) - 20
    c, r = comparisons.encode_pair(
        TOK, _text(*history, "The end."), _text(*history, "No, I will not go on."), seq_len
    )
    assert r == rejected[20:] and c == chosen[20:]  # the same 20 oldest tokens cut from both
    shared = len(_ids(*history)) + len(b"\n\nAssistant: ") - 20
    assert c[:shared] == r[:shared] and c[shared] != r[shared]


def test_when_one_start_would_lose_the_short_reply_each_side_keeps_its_own_end():
    long_reply = "x" * 80
    c, r = comparisons.encode_pair(TOK, _text("q", "ok"), _text("q", long_reply), 40)
    assert c == _ids("q", "ok")[-40:] and r == _ids("q", long_reply)[-40:]
    assert c[-1] == r[-1] == TOK.eos_id


def test_pairs_with_no_preference_left_are_dropped_and_counted(caplog):
    tail = "the same long answer " * 4
    cut_off = (_text("a?", tail), _text("b?", tail))  # differ only in the first turn
    no_reply = (_text("q", "yes"), _text("q", "yes", "and?", "more"))  # chosen is all history
    assert comparisons.encode_pair(TOK, *cut_off, 40) is None
    assert comparisons.encode_pair(TOK, *cut_off, 200) is not None
    assert comparisons.encode_pair(TOK, *no_reply, 200) is None
    good = (GOOD["chosen"], GOOD["rejected"])
    with caplog.at_level(logging.WARNING, logger="gptjax"):
        arrays = comparisons.hh_arrays(TOK, [cut_off, good, no_reply], 40)
    assert "dropped 2 of 3 pairs" in caplog.text and "(0-based indices [0, 2])" in caplog.text
    assert arrays["tokens"].shape == (1, 2, 40)
    np.testing.assert_array_equal(
        arrays["tokens"][0, 0, : arrays["mask"][0, 0].sum()], _ids("hi", "Hello!")
    )
    with pytest.raises(
        ValueError, match="all 2 HH pairs lose their preference .* raise hh_seq_len"
    ):
        comparisons.hh_arrays(TOK, [cut_off, no_reply], 40)


# ----------------------------------------------------------------------------- real HH pairs


def _first_rows(path, out, n):
    with gzip.open(path, "rt", encoding="utf-8") as f, gzip.open(out, "wt", encoding="utf-8") as g:
        for _, line in zip(range(n), f):
            g.write(line)
    return str(out)


def _response_mask(tokens_N2T, mask_N2T):
    """Tokens after the longest prefix the two windows share, by a loop over pairs."""
    out = mask_N2T.copy()
    for i, (a, b) in enumerate(tokens_N2T):
        d = next((t for t in range(len(a)) if a[t] != b[t]), len(a))
        out[i, :, :d] = 0
    return out


def _logps(cfg, params, tokens_BT, mask_BT, response_BT):
    """Summed response log-probs in float64 numpy from the model's logits."""
    from gptjax.models import gpt

    logits = np.asarray(gpt.forward(cfg, params, tokens_BT, mask=mask_BT), np.float64)
    logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    tok = np.take_along_axis(logits[:, :-1], tokens_BT[:, 1:, None], -1)[..., 0]
    return ((tok - logz[:, :-1]) * response_BT[:, 1:]).sum(-1)


def _check_accuracy(got, margin_N, tol):
    """`got` equals the fraction of positive margins up to the pairs within `tol` of a tie."""
    ties = np.abs(margin_N) < tol
    assert abs(got - np.mean(margin_N > 0)) <= np.mean(ties) + 1e-6


@pytest.mark.skipif(not os.path.exists(HH_SAMPLE), reason="no HH sample in ../shared/data")
def test_reward_model_and_dpo_on_real_hh_pairs(tmp_path):
    """The measurement of real human preferences, small: 200 HH harmless-base rows (20 held
    out), a 1-layer toy SFT policy; held-out accuracies are recomputed by hand in float64."""
    import gin
    import jax

    from gptjax.models import gpt
    from gptjax.parallel.mesh import MeshConfig
    from gptjax.rlhf import dpo, reward, sft
    from gptjax.training.optimizer import OptimizerConfig

    gin.clear_config()
    path = _first_rows(HH_SAMPLE, tmp_path / "hh.jsonl.gz", 200)
    mesh = MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
    opt = OptimizerConfig(peak_lr=1e-3, warmup_steps=1, decay="constant")
    model = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=512, max_len=64)
    sft_cfg = sft.SFTConfig(
        pretrain_steps=10, steps=10, batch_size=8, seq_len=63, n_demonstrations=64, log_every=10
    )
    sft_dir = str(tmp_path / "sft")
    sft.run_sft(sft_dir, model_cfg=model, sft_cfg=sft_cfg, opt_cfg=opt, mesh_cfg=mesh)
    rm_cfg = RewardConfig(
        hh_path=path, hh_seq_len=64, steps=10, batch_size=8, norm_samples=8, max_new_tokens=8
    )
    rs = reward.run_reward(str(tmp_path / "rm"), sft_dir, rm_cfg=rm_cfg, opt_cfg=opt, mesh_cfg=mesh)
    dpo_cfg = dpo.DPOConfig(beta=0.1, steps=10, batch_size=8, log_every=10)
    ds = dpo.run_dpo(
        str(tmp_path / "dpo"), sft_dir, dpo_cfg=dpo_cfg, rm_cfg=rm_cfg, opt_cfg=opt, mesh_cfg=mesh
    )
    assert rs["reward/n_train_prompts"] == 180
    for acc in (rs["reward/heldout_accuracy"], ds["heldout/accuracy"]):
        assert 0.0 <= acc <= 1.0
    assert ds["heldout/accuracy_start"] == 0.0  # at the reference every implicit reward is 0
    np.testing.assert_allclose(ds["heldout/loss_start"], math.log(2), rtol=1e-5)

    cfg, ref_params, tok = sft.load_policy(sft_dir)
    held = comparisons.hh_arrays(tok, comparisons.load_hh_jsonl(path), 64)
    held = {k: v[:20] for k, v in held.items()}  # the first tenth
    tokens, mask = held["tokens"].reshape(40, 64), held["mask"].reshape(40, 64)
    rm_model_cfg, rm_params, _ = reward.load_reward(str(tmp_path / "rm"))
    x = np.asarray(gpt.hidden_states(rm_model_cfg, rm_params["trunk"], tokens, mask=mask))
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    head = jax.device_get(rm_params["head"])
    s = x[np.arange(40), last].astype(np.float64) @ head["kernel"] + head["bias"]
    _check_accuracy(rs["reward/heldout_accuracy"], s[0::2] - s[1::2], 1e-4)

    _, dpo_params, _ = sft.load_policy(str(tmp_path / "dpo"))
    response = _response_mask(held["tokens"], held["mask"]).reshape(40, 64)
    r = dpo_cfg.beta * (
        _logps(cfg, dpo_params, tokens, mask, response)
        - _logps(cfg, ref_params, tokens, mask, response)
    )
    _check_accuracy(ds["heldout/accuracy"], r[0::2] - r[1::2], 1e-3)
