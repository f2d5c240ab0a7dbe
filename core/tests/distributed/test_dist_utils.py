"""Single-process vlp_core.distributed: launcher env resolution, fallbacks, rank-aware logging."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import vlp_core.distributed.utils as du
from vlp_core.distributed import (
    DistInfo,
    RankFilter,
    all_gather_no_grad,
    all_gather_object,
    all_gather_with_grad,
    all_reduce_sum,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
    rank_zero_only,
    resolve_launch_env,
    setup_logging,
    wrap_ddp,
)

_LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_resolve_torchrun_env_wins_over_slurm() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    env |= {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert resolve_launch_env(env) == {k: env[k] for k in _LAUNCH_KEYS}


def test_resolve_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    got = resolve_launch_env(base | {"SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"})
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                   "MASTER_PORT": "29500"}  # fmt: skip
    # An explicit MASTER_ADDR/PORT is respected.
    got = resolve_launch_env(base | {"MASTER_ADDR": "m", "MASTER_PORT": "7", "SLURM_LAUNCH_NODE_IPADDR": "x"})
    assert got is not None and (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("m", "7")
    # Else the first host of the nodelist, expanded by scontrol.
    calls: list[str] = []
    monkeypatch.setattr(du, "_first_slurm_host", lambda nl: calls.append(nl) or "gpu-a01")
    got = resolve_launch_env(base | {"SLURM_JOB_NODELIST": "gpu-a[01-04]"})
    assert got is not None and got["MASTER_ADDR"] == "gpu-a01" and calls == ["gpu-a[01-04]"]
    # Nothing to rendezvous on: a clear error rather than a hang.
    monkeypatch.setattr(du, "_first_slurm_host", lambda nl: None)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        resolve_launch_env(base | {"SLURM_JOB_NODELIST": "gpu-a[01-04]"})


def test_resolve_single_process_cases() -> None:
    assert resolve_launch_env({}) is None
    assert resolve_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}) is None
    # Inside an allocation but not launched by srun (no step): one process, must not wait for peers.
    assert resolve_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None


def test_init_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _LAUNCH_KEYS + ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None)
    assert (get_rank(), get_world_size(), is_main()) == (0, 1, True)
    assert not info.distributed and info.is_main
    with pytest.raises(ValueError, match="device"):
        init_distributed(device="tpu")


def test_collectives_are_identity_without_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert neighbour_exchange_with_grad(x, to_rank=0, from_rank=0) is x
    a, c = torch.ones(2), torch.zeros(2)
    from_left, from_right = neighbour_exchange_bidir_with_grad(a, c, left_rank=0, right_rank=0)
    assert from_left is c and from_right is a  # what I sent right comes back from my left
    g = all_gather_no_grad(x)
    assert torch.equal(g, x) and not g.requires_grad
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert broadcast_object("x") == "x"
    t = torch.tensor([2.0])
    assert all_reduce_sum(t) is t and t.item() == 2.0
    m = nn.Linear(2, 2)
    assert wrap_ddp(m, DistInfo(0, 1, 0, torch.device("cpu"), None)) is m


def test_rank_zero_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fn = rank_zero_only(lambda v: calls.append(v) or v)
    assert fn(1) == 1
    monkeypatch.setattr(du, "get_rank", lambda: 1)
    assert fn(2) is None and calls == [1]


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("vlp.test", level, __file__, 1, "msg", None, None)


def test_rank_filter() -> None:
    main, other = RankFilter(rank=0), RankFilter(rank=2)
    rec = _record(logging.INFO)
    assert main.filter(rec) and rec.rank_prefix == ""
    assert not other.filter(_record(logging.INFO))
    warn = _record(logging.WARNING)
    assert other.filter(warn) and warn.rank_prefix == "[rank 2] "


def test_rank_filter_reads_launcher_env_before_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert not RankFilter().filter(_record(logging.INFO))
    monkeypatch.setenv("RANK", "0")
    assert RankFilter().filter(_record(logging.INFO))


def test_setup_logging_is_idempotent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("RANK", "0")
    setup_logging("INFO")
    setup_logging("INFO")
    ours = [h for h in root.handlers if getattr(h, "_vlp_rank_handler", False)]
    assert len(ours) == 1
    logging.getLogger("vlp.test").info("hello-from-rank0")
    monkeypatch.setenv("RANK", "3")
    logging.getLogger("vlp.test").info("hidden-info")
    logging.getLogger("vlp.test").warning("shown-warning")
    err = capsys.readouterr().err
    assert (
        "hello-from-rank0" in err and "hidden-info" not in err and "[rank 3] vlp.test: shown-warning" in err
    )
