"""``mpq demo``: the whole round trip on the embedded defaults, through the HTTP API.

Train the small digits CNN (seconds), start the service, upload the model and data, submit
a plan, wait, print the frontier and the chosen plan, save the artifact, then keep serving
the dashboard until interrupted (``--no-serve`` to exit instead).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from service.cli.client import MpqClient
from service.cli.output import ExitCode
from service.cli.progress import ProgressPrinter, follow_job
from service.job_status import JobStatus
from service.settings import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="train a small model, plan it through the API, serve the dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("mpq-demo"), help="where the model, data and artifact go")
    demo.add_argument("--port", type=int, help="override MPQ_PORT")
    demo.add_argument("--no-serve", action="store_true", help="exit after the plan instead of serving")
    demo.add_argument(
        "--budget-fraction", type=float, default=0.3, help="size budget as a fraction of the float model (default 0.3)"
    )
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_path, calib_path, eval_path = _make_inputs(out)
    server, url = _start_server(settings)
    try:
        with MpqClient(url) as client:
            plan_id = _plan(client, model_path, calib_path, eval_path, args.budget_fraction, sys.stdout)
            artifact = out / "digits-cnn-mixed.onnx"
            sha256 = client.download_artifact(plan_id, artifact)
            print(f"\nartifact: {artifact} (sha256 {sha256[:16]}…)")
        if args.no_serve:
            return ExitCode.OK
        print(f"\ndashboard: {url}/plans/{plan_id}   (Ctrl-C to stop)")
        while server.is_alive():
            server.join(1.0)
        return ExitCode.OK
    finally:  # Ctrl-C or SIGTERM too (service/cli/signals.py): the server requeues the plan if it still runs
        _stop_server(server)


def _make_inputs(out: Path) -> tuple[Path, Path, Path]:
    import torch

    from sensitivity.examples import accuracy, export_onnx, trained_digits_cnn

    started = time.perf_counter()
    model, digits = trained_digits_cnn()
    print(
        f"trained the digits CNN in {time.perf_counter() - started:.1f} s: "
        f"test accuracy {100 * accuracy(model, digits.test_x, digits.test_y):.2f}%"
    )
    proto = export_onnx(model, torch.from_numpy(digits.train_x[:1]))
    paths = out / "digits-cnn.onnx", out / "calibration.npz", out / "evaluation.npz"
    paths[0].write_bytes(proto.SerializeToString())
    np.savez(paths[1], input=digits.train_x[:512], labels=digits.train_y[:512])
    np.savez(paths[2], input=digits.test_x, labels=digits.test_y)
    return paths


def _start_server(settings: Settings) -> tuple[threading.Thread, str]:
    import uvicorn

    from service.app import SERVER_OPTIONS, create_app
    from service.store.db import make_engine, upgrade

    settings.check_bind()
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    engine.dispose()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning", **SERVER_OPTIONS
        )
    )
    thread = threading.Thread(target=server.run, daemon=True, name="mpq-demo-server")
    thread.server = server  # type: ignore[attr-defined]
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"mpq: the server could not start on {settings.host}:{settings.port} (port in use?)")
        time.sleep(0.05)
    url = f"http://{settings.host}:{settings.port}"
    print(f"service on {url} (database {settings.resolved_database_url})")
    return thread, url


def _stop_server(thread: threading.Thread) -> None:
    thread.server.should_exit = True  # type: ignore[attr-defined]
    thread.join(timeout=15)


def _plan(
    client: MpqClient, model_path: Path, calib_path: Path, eval_path: Path, budget_fraction: float, out: TextIO
) -> str:
    model = client.upload_model(model_path, "digits-cnn")
    calibration = client.upload_dataset(calib_path, "digits-calibration")
    evaluation = client.upload_dataset(eval_path, "digits-evaluation")
    budget = int(model["size_bytes"] * budget_fraction)
    print(
        f"uploaded model {model['id']} ({model['layer_count']} layers, {model['size_bytes']} bytes); "
        f"planning under {budget} bytes",
        file=out,
    )
    job = client.submit(
        "/v1/plans",
        {
            "model_id": model["id"],
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
            "method": "interlayer",
            "search": "pareto",
            "constraints": {"max_size_bytes": budget},
            "options": {"seed": 0, "batch_size": 256},
        },
    )
    job = client.wait(job["id"], on_progress=follow_job(ProgressPrinter(out)), poll_s=0.5)
    if job["status"] != JobStatus.SUCCEEDED:
        raise SystemExit(f"mpq: the plan job {job['status']}: {job['error']}")
    plan_id = str(job["result"]["plan_id"])
    print_plan(client.get(f"/v1/plans/{plan_id}"), client.get(f"/v1/plans/{plan_id}/frontier"), out)
    return plan_id


def print_plan(plan: dict[str, Any], frontier: list[dict[str, Any]], out: TextIO) -> None:
    measured = plan["measured"]
    print("\nfrontier (predicted and measured):", file=out)
    print(f"  {'#':>2} {'size KB':>9} {'predicted ΔL':>13} {'metric %':>9} {'drop pp':>8}", file=out)
    for point in frontier:
        m = point["measured"] or {}
        metric = f"{m['metric']:9.2f}" if m else f"{'-':>9}"
        drop = f"{m['drop']:8.2f}" if m else f"{'-':>8}"
        print(
            f"  {point['index']:>2} {point['size_bytes'] / 1024:9.1f} {point['predicted_loss_change']:13.5f} "
            f"{metric} {drop}",
            file=out,
        )
    print(
        f"\nchosen plan {plan['id']}: {measured['metric_name']} {measured['metric']:.2f}% "
        f"(float {measured['baseline']:.2f}%, drop {measured['drop']:.2f} pp), "
        f"{plan['artifact']['size_bytes']} bytes",
        file=out,
    )
    nodes = plan["result"].get("layer_nodes") or {}
    for layer, candidate in plan["assignment"].items():
        node = (nodes.get(layer) or {}).get("node_name") or "-"
        print(f"  {layer:<24} {node:<32} {candidate}", file=out)
