"""Any value in any checked key is either accepted and trains, or rejected naming the key.

Hypothesis throws values of every kind (numbers, nan and inf, text, booleans, null, lists,
interpolations) at the config checks. `validate` must answer each with nothing or with a
`ConfigError` whose message names the key; any other exception is a traceback a user would
see. A few accepted configs are then built and trained for one batch through the same pieces
a run uses, to show that "accepted" means "trains".
"""

from __future__ import annotations

import copy
import math
import re
from functools import cache

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, validate
from tests.conftest import TINY, compose

# The key to change, and the config groups under which it is checked.
KEYS = {
    "tbptt.k": ["tbptt=fixed", "tbptt=k1k2", "tbptt=random"],
    "tbptt.k1": ["tbptt=k1k2"],
    "tbptt.k2": ["tbptt=k1k2"],
    "optimizer.lr": ["optimizer=adam", "optimizer=sgd"],
    "model.hidden_size": ["data=echo"],
    "model.dropout": ["data=echo"],
    "trainer.max_epochs": ["data=echo"],
    "data.seq_len": ["data=echo", "data=adding", "data=average"],
    "data.batch_size": ["data=echo", "data=average"],
    "data.lag": ["data=echo"],
}

JUNK = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from("abc"), st.integers(), max_size=2),
    # What a user can type that OmegaConf reads specially.
    st.sampled_from(["${nope}", "???", "${mul:2,x}", "1e-3", "nan", "inf", "", "10"]),
)


@cache
def base_config(group: str) -> DictConfig:
    return compose([group, *TINY, "trainer.num_threads=1"])


def with_value(group: str, key: str, value) -> DictConfig:
    cfg = copy.deepcopy(base_config(group))
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def names_key(message: str, key: str) -> bool:
    # The whole key, so that "tbptt.k" is not found inside "tbptt.k2".
    return re.search(rf"{re.escape(key)}(?!\w)", message) is not None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_is_accepted_or_rejected_naming_its_key(data) -> None:
    key = data.draw(st.sampled_from(sorted(KEYS)), label="key")
    group = data.draw(st.sampled_from(KEYS[key]), label="group")
    value = data.draw(JUNK, label="value")
    cfg = with_value(group, key, value)
    try:
        validate(cfg)
    except ConfigError as error:
        assert names_key(str(error), key), f"{key}={value!r} rejected as: {error}"
        event("rejected")
    else:
        event("accepted")


# ---- accepted means trains ---------------------------------------------------------------

# Values in the range a run takes, and values just outside it. Each example breaks at most
# one key on purpose; keys that bound each other (lag and seq_len, k1 and k2) break by chance.
VALID = {
    "tbptt.k": st.integers(1, 40),
    "optimizer.lr": st.floats(1e-5, 1.0),
    "model.hidden_size": st.integers(1, 12),
    "model.num_layers": st.integers(1, 3),
    "model.dropout": st.floats(0.0, 0.9),
    "data.seq_len": st.integers(2, 40),
    "data.batch_size": st.integers(1, 20),
    "data.lag": st.integers(1, 30),
}
INVALID = {
    "tbptt.k": st.sampled_from([-1, 0, 2.5, "8"]),
    "optimizer.lr": st.sampled_from([0.0, -1e-3, math.nan, math.inf]),
    "model.hidden_size": st.sampled_from([0, -2]),
    "model.num_layers": st.sampled_from([0, 1.5]),
    "model.dropout": st.sampled_from([-0.5, 1.0, 1.2]),
    "data.seq_len": st.sampled_from([0, -1]),
    "data.batch_size": st.sampled_from([0, "4"]),
    "data.lag": st.sampled_from([0, None]),
}
GROUPS = [f"data={data}" for data in ("echo", "adding", "average")]
MODES = ["tbptt=fixed", "tbptt=k1k2", "tbptt=random"]


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_accepted_config_trains_one_batch(data) -> None:
    import torch

    from src import tbptt
    from src.train import build_module

    overrides = [data.draw(st.sampled_from(GROUPS)), data.draw(st.sampled_from(MODES))]
    keys = [key for key in VALID if key != "data.lag" or overrides[0] == "data=echo"]
    broken = data.draw(st.sampled_from([None] * 4 + keys), label="broken")
    changes = {
        key: data.draw(INVALID[key] if key == broken else VALID[key], label=key) for key in keys
    }

    cfg = copy.deepcopy(compose([*overrides, *TINY, "trainer.num_threads=1"]))
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        validate(cfg)
    except ConfigError as error:
        message = str(error)
        assert any(names_key(message, key) for key in changes), message
        event("rejected")
        return
    event("accepted and trained")

    # Accepted: build it as a run does and take the optimizer steps of one batch.
    data_set, module = build_module(cfg)
    optimizer = module.configure_optimizers()
    before = [p.detach().clone() for p in module.parameters()]

    def step(loss: torch.Tensor, update: tbptt.Update) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    x, y = next(iter(data_set.train))
    losses, _ = tbptt.run_updates(
        module.model, x, y, module.schedule(x.shape[1]), module.loss_fn, step,
        first_target=data_set.spec.first_target,
    )
    assert losses, f"no window of {overrides} {changes} had a target"
    assert all(torch.isfinite(loss) for loss in losses), (overrides, changes, losses)
    after = list(module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
