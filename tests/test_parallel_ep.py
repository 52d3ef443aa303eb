"""Expert parallelism on real gloo process groups (2 and 4 processes on 127.0.0.1) against one
process running the same global batch.

Each test starts worker processes running this file as a script (``python
tests/test_parallel_ep.py SCENARIO OUT``, env RANK / WORLD_SIZE / MASTER_PORT), waits with a
timeout and kills what it started by PID. Workers write safetensors files the test compares
with the single-process reference computed here.

Tolerances: the EP forward runs the same float32 ops on the same rows as one process; only the
grouped GEMM's blocking (it sees fewer rows per call) and the order of the cross-rank gradient
sums differ, so values agree to float32 rounding: 1e-5 absolute on losses, outputs and grads
(values are O(1)).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"
if str(SRC) not in sys.path:  # the workers import smoe from this tree
    sys.path.insert(0, str(SRC))

TOL = 1e-5


# -- the model and batch every process builds ---------------------------------------------------
def _config(router="softmax_topk", capacity_factor=None, num_experts=8, hidden=32):
    from smoe.config import preset

    cfg = preset("tiny-moe")
    moe = cfg.moe.replace(hidden_size=hidden, expert_size=16, num_experts=num_experts, top_k=2,
                          router=router, capacity_factor=capacity_factor, aux_loss_coef=0.01,
                          z_loss_coef=0.001)
    return cfg.replace(hidden_size=hidden, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_seq_len=16, moe=moe)


def _build(cfg):
    from smoe.model import SMoETransformer

    torch.manual_seed(0)
    return SMoETransformer(cfg)


def _batch(cfg, B=8, T=12):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


SCENARIOS = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=1.0),
    "bias": dict(router="sigmoid_bias"),
}


# -- the worker ---------------------------------------------------------------------------------
def _run_scenario(scenario: str, out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from smoe.parallel import launch
    from smoe.parallel.expert_parallel import CommCounter, expert_parallel
    from smoe.parallel.placement import plan_placement

    name, _, variant = scenario.partition(":")
    if name == "hf":
        return _run_hf(out, rank, world)
    if name == "replace":
        return _run_replace(out, rank, world)
    kwargs = dict(SCENARIOS.get(name, {}))
    if name == "mismatch" and rank == 1:
        kwargs["hidden"] = 48
    if name == "indivisible":
        kwargs["num_experts"] = 6
    cfg = _config(**kwargs)
    model = _build(cfg)
    placement = None
    if variant == "replicas":  # 8 experts + 4 replicas on `world` ranks, from a skewed load
        placement = plan_placement(torch.tensor([40., 20, 10, 5, 3, 2, 1, 1]), world, 4)
    counter = CommCounter()
    ep = expert_parallel(model, dist.group.WORLD, placement=placement, counter=counter)
    x_BT, y_BT = _batch(cfg)
    B = x_BT.shape[0] // world
    mine = slice(rank * B, (rank + 1) * B)
    model.train()
    for step in range(3 if name == "kill" else 1):
        if name == "kill" and rank == 1 and step == 1:
            (out / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        out_ = model(x_BT[mine], targets_BT=y_BT[mine])
        aux = out_.aux_loss + ep.aux_loss_correction()  # the global batch's balance loss
        total = out_.loss + aux + out_.z_loss
        total.backward()
        launch.sync_gradients(model, ep, dist.group.WORLD)
        launch.all_reduce_expert_loads(model, dist.group.WORLD)
    tensors = {"logits": out_.logits.detach().contiguous(),
               "loss": out_.loss.detach().reshape(1),
               "aux": aux.detach().reshape(1),
               "z": out_.z_loss.detach().reshape(1),
               "bytes": torch.tensor([counter.dispatch_bytes, counter.combine_bytes,
                                      counter.rows_sent, counter.rows_local])}
    for li, (_, layer) in enumerate(model.moe_layers()):
        tensors[f"counts.{li}"] = out_.moe_infos[li].tokens_per_expert.clone()
        if layer.load_since_update is not None:
            tensors[f"load.{li}"] = layer.load_since_update.clone()
    full = launch.consolidated_state_dict(model, ep, dist.group.WORLD, grads=True)
    if rank == 0:
        tensors.update({f"grad.{k}": v.contiguous() for k, v in full.items()})
    save_file(tensors, str(out / f"{scenario}.rank{rank}.safetensors"))


def _hf_model():
    """A tiny random transformers Mixtral (4 experts, top-2), built offline, patched by smoe."""
    import transformers

    import smoe.hf

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return smoe.hf.patch(transformers.MixtralForCausalLM(cfg).float()), cfg


def _hf_batch(B=4, T=10):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (B, T), generator=g)


def _run_hf(out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from smoe.parallel import launch
    from smoe.parallel.expert_parallel import expert_parallel

    model, _ = _hf_model()
    ep = expert_parallel(model, dist.group.WORLD)
    ids = _hf_batch()
    B = ids.shape[0] // world
    model.train()
    res = model(ids[rank * B:(rank + 1) * B], labels=ids[rank * B:(rank + 1) * B])
    res.loss.backward()
    launch.sync_gradients(model, ep, dist.group.WORLD)
    full = launch.consolidated_state_dict(model, ep, dist.group.WORLD, grads=True)
    tensors = {"logits": res.logits.detach().contiguous(), "loss": res.loss.detach().reshape(1)}
    if rank == 0:
        tensors.update({f"grad.{k}": v.contiguous() for k, v in full.items()})
    save_file(tensors, str(out / f"hf.rank{rank}.safetensors"))


def _run_replace(out: Path, rank: int, world: int) -> None:
    """A running EP model moved to a new placement (with replicas) gives the same outputs and
    still holds the same weights."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from smoe.parallel import launch
    from smoe.parallel.expert_parallel import apply_placement, expert_parallel
    from smoe.parallel.placement import plan_placement

    cfg = _config()
    model = _build(cfg).eval()
    ep = expert_parallel(model, dist.group.WORLD)
    x_BT, _ = _batch(cfg)
    B = x_BT.shape[0] // world
    with torch.no_grad():
        before = model(x_BT[rank * B:(rank + 1) * B]).logits
        loads = [info.tokens_per_expert.double() + 1
                 for info in model(x_BT[rank * B:(rank + 1) * B]).moe_infos]
        for load in loads:  # every rank plans from the same (global) load
            dist.all_reduce(load)
        apply_placement(model, ep, [plan_placement(load, world, 4) for load in loads])
        after = model(x_BT[rank * B:(rank + 1) * B]).logits
    full = launch.consolidated_state_dict(model, ep)
    tensors = {"before": before.contiguous(), "after": after.contiguous(),
               "slots": torch.tensor([lay.slots.numel() for lay in ep.layers])}
    if rank == 0:
        tensors.update({f"w.{k}": v.contiguous() for k, v in full.items()})
    save_file(tensors, str(out / f"replace.rank{rank}.safetensors"))


def _worker(scenarios: str, out: Path) -> None:
    """Run each scenario in turn in one process group (starting processes is the slow part)."""
    from smoe.parallel.health import RankLostError, init_process_group, shutdown

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group("gloo", timeout_s=float(os.environ.get("SMOE_TEST_PG_TIMEOUT", "30")))
    for scenario in scenarios.split(","):
        try:
            _run_scenario(scenario, out, rank, world)
        except ValueError as exc:  # bad layouts: every rank raises the same, before any change
            (out / f"{scenario}.rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
        except RankLostError as exc:
            (out / f"{scenario}.rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
            (out / f"{scenario}.rank{rank}.at").write_text(repr(time.time()))
            if rank == 0:  # rank 0 hosts the store: let the others read the heartbeats first
                time.sleep(6)
            os._exit(3)  # no teardown of a broken process group (it can block)
    shutdown()


# -- the launcher -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int, out: Path, timeout_s: float = 90.0,
            pg_timeout_s: float = 30.0) -> tuple[list[int], float]:
    port = _free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(SRC), OMP_NUM_THREADS="1",
                   SMOE_TEST_PG_TIMEOUT=str(pg_timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(HERE), scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    codes = []
    try:
        for p in procs:
            left = max(timeout_s - (time.monotonic() - start), 0.1)
            p.wait(timeout=left)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    elapsed = time.monotonic() - start
    for rank, p in enumerate(procs):
        log = p.stdout.read().decode(errors="replace")
        p.stdout.close()
        if codes[rank] not in (0, 3, -signal.SIGKILL):
            raise AssertionError(f"rank {rank} exited {codes[rank]}:\n{log[-3000:]}")
    return codes, elapsed


def _load(out: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"{stem}.safetensors"))


def _reference(scenario: str):
    """One process, the whole batch: logits, losses, grads, loads."""
    cfg = _config(**SCENARIOS[scenario.partition(":")[0]])
    model = _build(cfg)
    model.train()
    x_BT, y_BT = _batch(cfg)
    out = model(x_BT, targets_BT=y_BT)
    (out.loss + out.aux_loss + out.z_loss).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    loads = [layer.load_since_update for _, layer in model.moe_layers()]
    return out, grads, loads, [i.tokens_per_expert for i in out.moe_infos]


def _check_equal_to_one_process(out_dir: Path, scenario: str, world: int) -> None:
    out, grads, loads, counts = _reference(scenario)
    ranks = [_load(out_dir, f"{scenario}.rank{r}") for r in range(world)]
    logits = torch.cat([r["logits"] for r in ranks])
    torch.testing.assert_close(logits, out.logits.detach(), atol=TOL, rtol=0)
    # Each rank's loss is its local mean; their mean is the global mean (equal local batches).
    for key, ref in (("loss", out.loss), ("aux", out.aux_loss), ("z", out.z_loss)):
        got = torch.stack([r[key][0] for r in ranks]).mean()
        assert abs(float(got) - float(ref.detach())) < TOL, (scenario, key, float(got))
    assert float(out.aux_loss.detach()) > 0 and float(out.z_loss.detach()) > 0
    for name, g in grads.items():
        torch.testing.assert_close(ranks[0][f"grad.{name}"], g, atol=TOL, rtol=0,
                                   msg=lambda m, name=name: f"{scenario} {name}: {m}")
    for li, ref in enumerate(counts):  # per-rank counts sum to the global counts
        assert torch.equal(sum(r[f"counts.{li}"] for r in ranks), ref)
        if loads[li] is not None:  # bias balancing: loads summed across ranks before the update
            for r in ranks:
                assert torch.equal(r[f"load.{li}"], loads[li])
    if scenario.startswith("capacity"):  # capacity dropped something: the test bites
        assert int(sum(c.sum() for c in counts)) < 2 * logits.shape[0] * logits.shape[1] \
            * len(counts)
    if scenario == "dropless":  # bytes moved = remote (token, expert) rows * D * 4, exactly
        _check_bytes(out, ranks, world)


def _check_bytes(out, ranks, world: int) -> None:
    """The bytes the all-to-alls moved equal the plan's communication model (smoe.plan.comm),
    exactly for dropless routing: every (token, expert) pair whose expert lives on another rank
    crosses once in dispatch and once back in combine, a row of D float32."""
    from smoe.plan.comm import CommConfig, a2a_bytes_from_routing, comm_per_layer

    D, E = 32, 8
    B, T = out.logits.shape[:2]
    per_rank = B // world
    rank_of_expert = [e // (E // world) for e in range(E)]
    want = [0] * world
    remote_rows = 0
    for info in out.moe_infos:
        experts_BTK = info.expert_indices.view(B, T, -1)
        for r in range(world):
            rows, nbytes = a2a_bytes_from_routing(
                experts_BTK[r * per_rank:(r + 1) * per_rank].reshape(-1, 2), rank_of_expert, r,
                hidden=D, dtype_bytes=4)
            want[r] += nbytes
            remote_rows += rows
    for r in range(world):
        assert int(ranks[r]["bytes"][0]) == want[r], (r, int(ranks[r]["bytes"][0]), want[r])
    assert sum(int(x["bytes"][1]) for x in ranks) == sum(want)  # combine: the same rows back
    # The per-token model with the measured local fraction gives the same total.
    pairs = B * T * 2 * len(out.moe_infos)
    model = comm_per_layer(CommConfig(hidden=D, top_k=2, num_experts=E, ep=world,
                                      dispatch_dtype="fp32", combine_dtype="fp32",
                                      local_fraction=1 - remote_rows / pairs), tokens=1)
    total = model.dispatch_bytes * B * T * len(out.moe_infos)
    assert abs(total - sum(want)) < 1e-6 * sum(want)


@pytest.mark.timeout(300)
def test_ep2_equals_one_process_native_and_hf_rejects_mismatched_configs(tmp_path):
    codes, _ = _launch("dropless,bias,mismatch,hf", 2, tmp_path, timeout_s=240)
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("*.err")]
    _check_hf(tmp_path, 2)  # a transformers Mixtral patched by smoe.hf.patch, then sharded
    _check_equal_to_one_process(tmp_path, "dropless", 2)
    _check_equal_to_one_process(tmp_path, "bias", 2)
    for r in range(2):
        msg = (tmp_path / f"mismatch.rank{r}.err").read_text()
        assert "differs across ranks" in msg and "\n" not in msg, msg


def _check_hf(out_dir: Path, world: int) -> None:
    model, _ = _hf_model()
    model.train()
    ids = _hf_batch()
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ranks = [_load(out_dir, f"hf.rank{r}") for r in range(world)]
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), ref.logits.detach(),
                               atol=TOL, rtol=0)
    # HF's loss is the mean over each rank's tokens; equal token counts, so the mean of means.
    got = torch.stack([r["loss"][0] for r in ranks]).mean()
    assert abs(float(got) - float(ref.loss.detach())) < TOL
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert any("experts" in k for k in grads)
    for name, g in grads.items():
        torch.testing.assert_close(ranks[0][f"grad.{name}"], g, atol=TOL, rtol=0,
                                   msg=lambda m, name=name: f"hf {name}: {m}")


@pytest.mark.timeout(300)
def test_ep4_equals_one_process_capacity_replicas_replacement_indivisible(tmp_path):
    scenarios = ["dropless", "capacity", "dropless:replicas", "indivisible", "replace"]
    codes, _ = _launch(",".join(scenarios), 4, tmp_path, timeout_s=240)
    assert codes == [0] * 4, [p.read_text() for p in tmp_path.glob("*.err")]
    for scenario in scenarios[:3]:
        _check_equal_to_one_process(tmp_path, scenario, 4)
    # apply_placement on the running model: same outputs, same weights, 3 slots per rank now.
    ranks = [_load(tmp_path, f"replace.rank{r}") for r in range(4)]
    for r in ranks:
        torch.testing.assert_close(r["after"], r["before"], atol=TOL, rtol=0)
        assert r["slots"].tolist() == [3, 3]
    for name, w in _build(_config()).state_dict().items():
        assert torch.equal(ranks[0][f"w.{name}"], w), name
    for r in range(4):
        msg = (tmp_path / f"indivisible.rank{r}.err").read_text()
        assert "does not divide num_experts" in msg and "\n" not in msg, msg


@pytest.mark.timeout(200)
def test_killed_rank_is_named_within_60s(tmp_path):
    codes, _ = _launch("kill", 4, tmp_path, timeout_s=150, pg_timeout_s=20)
    all_exited = time.time()
    assert codes[1] == -signal.SIGKILL
    killed_at = float((tmp_path / "killed_at").read_text())
    for rank in (0, 2, 3):
        assert codes[rank] == 3
        msg = (tmp_path / f"kill.rank{rank}.err").read_text()
        assert "lost rank 1" in msg and "\n" not in msg, msg
        delay = float((tmp_path / f"kill.rank{rank}.at").read_text()) - killed_at
        print(f"rank {rank} named the lost rank {delay:.1f} s after the kill")
        assert delay < 60
    # Every survivor has exited (rank 0, the store's host, waits 6 s for the others' reads).
    assert all_exited - killed_at < 60, all_exited - killed_at


def test_missing_rendezvous_is_one_line():
    from smoe.parallel.health import init_process_group

    with pytest.raises(RuntimeError, match="rendezvous at 127.0.0.1") as exc:
        init_process_group("gloo", rank=1, world_size=2, addr="127.0.0.1", port=_free_port(),
                           timeout_s=2)
    assert "\n" not in str(exc.value)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
