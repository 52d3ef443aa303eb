"""`smoe monitor RUN`: the routing monitor's figures offline, from a run's validation data."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register_monitor"]


def _load_run_and_val(run_dir: str, batches: int, device: str):
    """(model, validation batches in stream order) of a run; the one place this command
    touches run loading."""
    from smoe.runs import load_run
    from smoe.data import DataConfig, prepare_data, val_batches

    run = load_run(run_dir, device=device)
    train = run.config.get("train") or {}
    seq_len = min(int(train.get("seq_len", 256)), run.model.config.max_seq_len)
    batch_size = int(train.get("micro_batch_size", 8))
    data_cfg = run.config.get("data") or {"tokenizer": run.tokenizer.kind}
    data = prepare_data(DataConfig(**data_cfg), run_dir=run.run_dir)
    return run.model, val_batches(data.val, batch_size, seq_len, max_batches=batches)


def register_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="routing report of a run on its validation data "
                                       "(per-layer load, imbalance, drift over windows, alerts) "
                                       "as text, PNG and HTML")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--out", default=None,
                   help="folder for report.html and its PNGs (default RUN/monitor)")
    p.add_argument("--batches", type=int, default=16, help="validation batches (default 16)")
    p.add_argument("--window-tokens", type=int, default=None,
                   help="tokens per window (default: one window per validation batch)")
    p.add_argument("--reference", default=None,
                   help="routing reference (.safetensors or .json) to measure drift against "
                        "(default: the first window)")
    p.add_argument("--save-reference", default=None,
                   help="also write the run's counts as a reference file for `smoe serve`")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")

    def run(a: argparse.Namespace) -> int:
        import torch

        from smoe.monitor import RoutingMonitor, format_alerts, format_summary, write_html_report

        if a.batches < 1:
            raise ValueError(f"--batches {a.batches} must be >= 1")
        device = a.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, val = _load_run_and_val(a.run_dir, a.batches, device)
        if not any(True for _ in model.moe_layers()):
            raise ValueError(f"{a.run_dir!r} is a dense model: there is no routing to monitor")
        window = a.window_tokens or int(val[0][0].numel())
        monitor = RoutingMonitor(window_tokens=window, reference=a.reference or "first")
        monitor.attach(model.moe_layers())
        with torch.no_grad():
            for batch in val:
                model(batch[0].to(device))
        monitor.close_window()
        out = Path(a.out) if a.out else Path(a.run_dir) / "monitor"
        html = write_html_report(out / "report.html", monitor,
                                 title=f"Routing of {Path(a.run_dir).name} on validation data",
                                 notes=[f"{len(val)} validation batches, windows of {window} "
                                        "tokens in stream order."])
        print(format_summary(monitor.counts(), monitor.layer_names, monitor.drift()))
        print(format_alerts(monitor.alerts))
        if a.save_reference:
            print(f"reference: {monitor.save_reference(a.save_reference)}")
        print(f"report: {html}")
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_monitor,)
