"""Golden one-step metrics: one train step of each trainer on a fixed tiny fp32 model and batch.

For the decoder (also with 2 microbatches), the encoder, the encoder–decoder, the reward model
and one PPO minibatch update, the step's `loss` and `grad_norm` and the loss of the updated
params on the same batch (`loss_after`: the loss a second call of the step computes before it
updates) equal the numbers in `GOLDEN` (rtol 1e-5, fp32 on CPU). A refactor that should not
change the numerics is checked against numbers, not just "it runs".

These are golden values from the tree at commit 843ec9f. If a change alters them on purpose,
rerun `python tests/test_golden.py --print` and paste the new values here, saying why in the
commit.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import ppo, reward
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import TrainState, make_trainer

GOLDEN = {
    "decoder": {"loss": 4.1724916, "grad_norm": 3.6844091, "loss_after": 3.9725602},
    "decoder_accum2": {"loss": 4.1724916, "grad_norm": 3.6844091, "loss_after": 3.9725602},
    "encoder": {"loss": 4.138048, "grad_norm": 3.386904, "loss_after": 4.0272484},
    "seq2seq": {"loss": 4.1856933, "grad_norm": 1.069217, "loss_after": 4.144004},
    "reward": {"loss": 1.5309036, "grad_norm": 36.23378, "loss_after": 0.40792271},
    "ppo": {"loss": 0.9464496, "grad_norm": 15.635916, "loss_after": 0.6440459},
}
RTOL = 1e-5
HOW_TO_UPDATE = (
    "golden values from the tree at commit 843ec9f; if a change alters them on "
    "purpose, rerun `python tests/test_golden.py --print` and paste the new values, "
    "saying why in the commit"
)

B, T, S, V = 4, 8, 6, 64  # rows, target length, seq2seq source length, vocab
SIZE = {
    "n_layers": 2,
    "d_model": 32,
    "n_heads": 4,
    "vocab_size": V,
    "max_len": 16,
    "embd_dropout": 0.0,
    "attn_dropout": 0.0,
    "resid_dropout": 0.0,
    "dtype": "float32",
    "param_dtype": "float32",
}
CONFIGS = {
    "decoder": ModelConfig(**SIZE),
    "encoder": EncoderConfig(**SIZE),
    "seq2seq": Seq2SeqConfig(**SIZE),
}
OPT = OptimizerConfig(peak_lr=1e-3, warmup_steps=0, decay="constant")  # AdamW, wd 0.1, clip 1
SEED = 0
# XLA's CPU backend at -O0: these steps compile in less than half the time, and their numbers
# agree with the default -O2 build to ~1e-7 (far inside RTOL), so the goldens hold for both.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compiled(jitted, *args):
    """`jitted` (a trainer's own jitted function: its shardings, its donation) compiled for
    `args` with FAST_COMPILE; call it with the same arguments."""
    return jitted.lower(*args).compile(FAST_COMPILE)


def _mesh():
    mesh_cfg = sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
    return sharding.make_mesh(mesh_cfg, jax.devices()[:1]), logical.logical_axis_rules("dp")


def _ragged_mask(lengths, t: int) -> np.ndarray:
    """Right-padded (len(lengths), t) float mask with lengths[i] ones in row i."""
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def family_batch(name: str) -> dict:
    """The fixed batch of a family, in its format (`family` docstring), from RandomState(0)."""
    rng = np.random.RandomState(0)
    ints = lambda *shape: rng.randint(1, V, shape).astype(np.int32)  # noqa: E731
    if name == "decoder":
        return {"tokens": ints(B, T + 1), "loss_mask": _ragged_mask([8, 3, 5, 1], T)}
    if name == "encoder":
        targets = ints(B, T)
        chosen = (rng.rand(B, T) < 0.4) | (np.arange(T)[None] == np.arange(B)[:, None])
        tokens = np.where(chosen, V - 1, targets).astype(np.int32)  # V - 1 plays [MASK]
        return {"tokens": tokens, "targets": targets, "loss_mask": chosen.astype(np.float32)}
    src, tgt = ints(B, S), ints(B, T)
    tgt_in = np.concatenate([np.ones((B, 1), np.int32), tgt[:, :-1]], 1)
    return {
        "src": src,
        "src_mask": _ragged_mask([6, 4, 6, 2], S).astype(np.int32),
        "tgt_in": tgt_in,
        "tgt": tgt,
        "tgt_mask": _ragged_mask([8, 6, 2, 7], T),
    }


def _step_twice(step, state, batch: tuple, loss_key: str, norm_key: str) -> dict:
    """(loss, grad_norm) of the first `step(state, *batch)`, and the loss of its updated params
    on the same batch: the loss of a second call of the same compiled step (which computes it
    before it updates). A metric may be a (1, 1) stack of one minibatch's (PPO)."""
    step = _compiled(step, state, *batch)
    state, first = step(state, *batch)
    _, second = step(state, *batch)
    value = lambda m, k: np.asarray(m[k]).item()  # noqa: E731
    return {
        "loss": value(first, loss_key),
        "grad_norm": value(first, norm_key),
        "loss_after": value(second, loss_key),
    }


@functools.lru_cache
def _trainer(name: str, grad_accum_steps: int = 1):
    cfg = CONFIGS[name]
    opt_cfg = OptimizerConfig(**{**OPT.__dict__, "grad_accum_steps": grad_accum_steps})
    return make_trainer(cfg, opt_cfg, 10, *_mesh(), B)


@functools.lru_cache
def _initial_state(name: str) -> TrainState:
    """`init_train_state(SEED)` of the family's trainer, on the host (steps donate theirs)."""
    trainer = _trainer(name)
    with logical.use_mesh(trainer.mesh, trainer.rules):
        return jax.device_get(_compiled(trainer.init_train_state, SEED)())


def family_step(name: str, grad_accum_steps: int = 1) -> dict:
    """One `make_trainer` train step on the family's batch (the initial state is shared by
    the grad_accum_steps cases: the same `init_train_state`, compiled once)."""
    trainer = _trainer(name, grad_accum_steps)
    state = jax.device_put(_initial_state(name), trainer.state_shardings)
    batch = {k: jnp.asarray(v) for k, v in family_batch(name).items()}
    with logical.use_mesh(trainer.mesh, trainer.rules):
        return _step_twice(trainer.train_step, state, (batch,), "train/loss", "grad_norm")


# ------------------------------------------------------------------------- the RLHF trainers

K, L, WIDTH = 3, 10, 4  # responses per prompt, RM sequence length, PPO prompt width
RLHF_CFG = CONFIGS["decoder"]


def _policy_and_rm():
    """The decoder's initial params as the policy, and a reward model on the same trunk."""
    policy = _initial_state("decoder").params
    return policy, jax.device_get(reward.from_policy(RLHF_CFG, policy, jax.random.key(SEED + 1)))


def reward_batch() -> dict:
    """B prompts with K ranked, right-padded responses; prompt 3 has only two valid ones."""
    rng = np.random.RandomState(0)
    mask = _ragged_mask(rng.randint(2, L + 1, B * K), L).reshape(B, K, L).astype(np.int32)
    tokens = (rng.randint(1, V, (B, K, L)) * mask).astype(np.int32)
    ranks = np.array([[0, 1, 2], [2, 0, 1], [1, 1, 0], [0, 2, 1]], np.int32)
    valid = np.ones((B, K), np.int32)
    valid[3, 2] = 0
    return {"tokens": tokens, "mask": mask, "ranks": ranks, "valid": valid}


def reward_step() -> dict:
    """One `reward.make_train_step` step on `reward_batch`."""
    mesh, rules = _mesh()
    optimizer = make_optimizer(OPT, 10)
    rm = _policy_and_rm()[1]
    step, shard = reward.make_train_step(RLHF_CFG, optimizer, rm, mesh, rules)
    batch = {k: jnp.asarray(v) for k, v in reward_batch().items()}
    state = jax.device_put(
        TrainState(
            step=jnp.zeros((), jnp.int32),
            params=rm,
            opt_state=optimizer.init(rm),
            rng=jax.random.key_data(jax.random.key(SEED)),
        ),
        shard,
    )
    with logical.use_mesh(mesh, rules):
        return _step_twice(step, state, (batch,), "reward/loss", "reward/grad_norm")


def ppo_batch() -> dict:
    """B rollouts: WIDTH prompt tokens then L - WIDTH ragged response tokens, with fixed
    sampler logprobs, values, advantages and returns."""
    rng = np.random.RandomState(0)
    r = L - WIDTH
    resp_mask = _ragged_mask([6, 2, 4, 1], r)
    mask = np.concatenate([np.ones((B, WIDTH)), resp_mask], 1).astype(np.int32)
    f = lambda: rng.normal(size=(B, r)).astype(np.float32)  # noqa: E731
    return {
        "tokens": (rng.randint(1, V, (B, L)) * mask).astype(np.int32),
        "mask": mask,
        "resp_mask": resp_mask,
        "logprobs": f() - 4.0,
        "values": f(),
        "advantages": f(),
        "returns": f(),
    }


def ppo_step() -> dict:
    """One PPO minibatch update (`ppo.make_ppo`'s update with 1 epoch of 1 minibatch) on
    `ppo_batch`; the second update's loss is `ppo.minibatch_loss` of the updated params (on the
    same rows in another order, which a mean over tokens does not see)."""
    mesh, rules = _mesh()
    ppo_cfg = ppo.PPOConfig(batch_size=B, minibatches=1, epochs=1, vf_coef=0.3)
    fns = ppo.make_ppo(RLHF_CFG, RLHF_CFG, ppo_cfg, OPT, WIDTH, mesh, rules)
    policy, rm = _policy_and_rm()
    state = ppo.init_state(fns, policy, ppo.critic_from_reward(rm, reward.identity_norm()), SEED)
    exp = {k: jnp.asarray(v) for k, v in ppo_batch().items()}
    with logical.use_mesh(mesh, rules):
        return _step_twice(fns.update, state, (exp, None), "ppo/loss/total", "ppo/grad_norm")


CASES = {
    "decoder": lambda: family_step("decoder"),
    "decoder_accum2": lambda: family_step("decoder", grad_accum_steps=2),
    "encoder": lambda: family_step("encoder"),
    "seq2seq": lambda: family_step("seq2seq"),
    "reward": reward_step,
    "ppo": ppo_step,
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_metrics_equal_the_golden_values(case):
    got = CASES[case]()
    for metric, want in GOLDEN[case].items():
        np.testing.assert_allclose(
            got[metric], want, rtol=RTOL, err_msg=f"{case} {metric}: {HOW_TO_UPDATE}"
        )


def _print_golden() -> None:
    """The current values, in the format of `GOLDEN` above."""
    print("GOLDEN = {")
    for case, run in CASES.items():
        values = ", ".join(f'"{k}": {np.float32(v)!s}' for k, v in run().items())
        print(f'    "{case}": {{{values}}},')
    print("}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--print"]:
        sys.exit("usage: python tests/test_golden.py --print")
    jax.config.update("jax_platforms", "cpu")  # the goldens are CPU numbers, as under pytest
    _print_golden()
