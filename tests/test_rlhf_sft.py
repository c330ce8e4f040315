"""SFT: the loss counts response tokens only; examples are laid out as the sampler sees them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.data.tokenizer import ByteTokenizer
from gptjax.models import gpt as model
from gptjax.rlhf import chat, sft
from gptjax.training.step import loss_fn
from tests.rlhf_fixtures import CFG
from tests.rlhf_fixtures import params as init_params

forward = jax.jit(functools.partial(model.forward, CFG))  # eager ops are slow on CPU
lm_loss = jax.jit(functools.partial(loss_fn, CFG))


def _masked_nll(params, tokens, targets, mask):
    logits = forward(params, jnp.asarray(tokens)[None])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(targets)[None])
    return float((nll * mask).sum() / mask.sum())


def test_loss_mask_marks_exactly_the_response_targets():
    tokens, mask = sft.make_example([10, 11, 12], [20, 21, 3], seq_len=7, pad_id=0)
    np.testing.assert_array_equal(tokens, [10, 11, 12, 20, 21, 3, 0, 0])
    # mask[t] scores predicting tokens[t + 1]: targets 20, 21 and the end-of-turn 3.
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0])
    # Too long: the prompt loses its oldest tokens, never the response.
    tokens, mask = sft.make_example([9, 10, 11, 12], [20, 3], seq_len=4, pad_id=0)
    np.testing.assert_array_equal(tokens, [10, 11, 12, 20, 3])
    with pytest.raises(ValueError, match="does not fit"):
        sft.make_example([1], [2] * 9, seq_len=8, pad_id=0)


def test_sft_loss_ignores_prompt_targets_and_sees_response_tokens():
    params = init_params(0)
    tokens, mask = sft.make_example([10, 11, 12, 13, 14], [20, 21, 22, 3], seq_len=11, pad_id=0)
    batch = {"tokens": jnp.asarray(tokens)[None], "loss_mask": jnp.asarray(mask)[None]}
    loss = float(lm_loss(params, batch))
    inputs, targets = tokens[:-1], tokens[1:].copy()
    assert loss == pytest.approx(_masked_nll(params, inputs, targets, mask), rel=1e-5)
    # Garbage targets at prompt (and padding) positions change nothing...
    targets[mask == 0] = 99
    assert loss == pytest.approx(_masked_nll(params, inputs, targets, mask), rel=1e-5)
    # ...while a different response token does.
    changed = tokens.copy()
    changed[6] = 77
    batch2 = {"tokens": jnp.asarray(changed)[None], "loss_mask": jnp.asarray(mask)[None]}
    assert abs(float(lm_loss(params, batch2)) - loss) > 1e-3


def test_demonstrations_use_the_chat_format():
    tok = ByteTokenizer()
    pairs = [([("Human", "hi")], "hello"), ([("Human", "bye")], "ciao")]
    arrays = sft.demonstration_arrays(tok, pairs, seq_len=40)
    row, mask = arrays["tokens"][0], arrays["loss_mask"][0]
    response = row[1:][mask == 1].tolist()
    assert response == chat.response_ids(tok, "hello")
    assert tok.decode(row[: int(np.argmax(mask)) + 1]) == "\n\nHuman: hi\n\nAssistant:"


def test_config_errors():
    with pytest.raises(ValueError, match="SFTConfig.steps"):
        sft.SFTConfig(steps=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(sft.batches({"tokens": np.zeros((3, 4))}, 8, 0))
