"""Command line: ``secure-fl`` (simulate, audit, config, presets, bench), ``secure-fl-server``, ``secure-fl-client``.

A thin layer over the library: parse arguments, resolve the config (file or preset, then
``--set`` overrides), call `secure_fl.simulation.simulate`, `FederatedServer` or
`FederatedClient`. User errors print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protocols.errors import ProtocolError
from secure_fl.config import Config, load_config, presets
from secure_fl.errors import ConfigError, SecureFLError

EXIT_USAGE = 2
#: ``secure-fl audit --empirical`` found a lower bound above the theoretical epsilon (a bug).
EXIT_AUDIT_VIOLATION = 3
#: ``privacy.audit.report.NO_RELEASE``, kept here so ``secure-fl --help`` imports no privacy code.
_NO_RELEASE = "no release: nothing spent"


def _add_config_args(parser: argparse.ArgumentParser, *, default_preset: str | None, required: bool | None = None) -> None:
    group = parser.add_mutually_exclusive_group(required=default_preset is None if required is None else required)
    group.add_argument("--config", metavar="FILE", help="TOML config file")
    group.add_argument("--preset", metavar="NAME", help="bundled preset (see `secure-fl presets`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set run.rounds=3",
    )


def _config(args: argparse.Namespace, default_preset: str | None = None) -> Config:
    preset = args.preset if (args.preset or args.config) else default_preset
    return load_config(args.config, preset, args.overrides)


def _guard(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except (SecureFLError, ProtocolError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, ValueError)) else 1
    except KeyboardInterrupt:
        print("interrupted: the round in flight was not released; the run's report says so", file=sys.stderr)
        return 130


def _simulate(args: argparse.Namespace) -> int:
    config = _config(args, default_preset="bbc-news")
    if args.ray_address is not None and (args.backend or config.simulation.backend) != "ray":
        raise ConfigError("--ray-address needs --backend ray (or simulation.backend = 'ray')", key="simulation.ray_address")
    backend = {"backend": args.backend} if args.backend else {}
    address = {"ray_address": args.ray_address} if args.ray_address is not None else {}
    if backend or address:
        config = config.replace(simulation=dataclasses.replace(config.simulation, **backend, **address))
    from secure_fl.simulation import simulate

    started = time.perf_counter()
    result = simulate(config, args.out)
    elapsed = time.perf_counter() - started
    stopped = f" ({result.stop_reason})" if result.stopped_early else ""
    print(f"done in {elapsed:.1f} s: {len(result.metrics)} rounds{stopped}, final {result.headline}; outputs in {result.run_dir}")
    print(_privacy_summary(result.epsilon, config.privacy.delta, result.report_html))
    if result.empirical_audit is not None:
        return _print_empirical(result.empirical_audit)
    return 0


def _print_empirical(path: Path) -> int:
    """Print an empirical audit's result; `EXIT_AUDIT_VIOLATION` when its bound exceeds the theory."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    theory = data["theoretical_epsilon_min"]
    print(
        f"empirical audit ({data.get('level', 'client')} level): epsilon >= {data['epsilon_lower_bound']:.4f} at {100 * data['confidence']:g}% confidence "
        f"({data['canaries']} canaries, {data['correct']}/{data['guesses']} guesses correct); theoretical epsilon "
        f"{'inf' if theory is None else f'{theory:.4f}'} at delta={data['delta']:g}; verdict: {data['verdict']}; wrote {path}"
    )
    if data["verdict"] == "violation":
        print(f"error: {data['message']}", file=sys.stderr)
        return EXIT_AUDIT_VIOLATION
    return 0


def _epsilon_text(epsilon: dict[str, float], delta: float) -> str:
    """``epsilon at delta=D: rdp X, prv Y`` (``inf`` means no guarantee)."""
    spent = ", ".join(f"{name} {value:.4g}" for name, value in epsilon.items())
    return f"epsilon at delta={delta:g}: {spent}" if spent else _NO_RELEASE


def _privacy_summary(epsilon: dict[str, float], delta: float, report: Path | None) -> str:
    """One line: epsilon per accountant and where the report is (with DP-SGD: both levels)."""
    sample = _sample_level_text(report)
    unbounded = any(v == float("inf") for v in epsilon.values())
    note = (" (no client-level guarantee)" if sample else " (no differential privacy)") if unbounded else ""
    level = "client-level " if sample else ""
    return f"privacy: {level}{_epsilon_text(epsilon, delta)}{note}{sample}; report: {report if report else 'not written'}"


def _sample_level_text(report: Path | None) -> str:
    """``; sample-level epsilon (DP-SGD, largest over clients): rdp X`` from the written report, or ``""``."""
    json_path = report.with_suffix(".json") if report is not None else None
    if json_path is None or not json_path.is_file():
        return ""
    section = json.loads(json_path.read_text(encoding="utf-8")).get("sample_level")
    if not section:
        return ""
    worst = ", ".join(f"{k} {'inf' if v is None else f'{v:.4g}'}" for k, v in section.get("max_epsilon", {}).items())
    return f"; sample-level epsilon (DP-SGD, largest over clients): {worst or 'none accounted'}"


def _audit(args: argparse.Namespace) -> int:
    if not args.empirical and (args.canaries is not None or args.confidence is not None):
        print("error: --canaries and --confidence belong to --empirical", file=sys.stderr)
        return EXIT_USAGE
    if args.empirical:
        from secure_fl.empirical_audit import run_empirical_audit

        result = run_empirical_audit(
            args.run_dir, canaries=args.canaries, confidence=0.95 if args.confidence is None else args.confidence,
        )
        status, report = _print_empirical(result.path), result.report
    else:
        from secure_fl.audit import audit

        status, report = 0, audit(args.run_dir)
    from privacy.ledger import epsilon_from_json

    final = {name: epsilon_from_json(value) for name, value in report.data["epsilon"]["final"].items()}
    warnings = report.data["warnings"]
    mechanism = report.data["mechanism"]
    spent = _epsilon_text(final, mechanism["delta"]) if mechanism.get("releases") else _NO_RELEASE
    if report.data.get("sample_level") and mechanism.get("releases"):
        spent = "client-level " + spent + _sample_level_text(report.html_path)
    print(f"{spent}; {len(warnings)} warning(s)")
    for warning in warnings:
        print(f"  [{warning['severity']}] {warning['message']}")
    print(f"wrote {report.json_path}\nwrote {report.html_path}")
    return status


def _show_config(args: argparse.Namespace) -> int:
    from secure_fl.config import explain_config

    config = _config(args, default_preset="bbc-news")
    print(explain_config(config) if args.explain else config.to_toml(), end="")
    return 0


def _bench_peft(args: argparse.Namespace) -> int:
    """``secure-fl bench peft``: one simulated run per rule, one JSON line each."""
    from secure_fl.bench.peft import PeftBench, run_peft_bench

    rules = tuple(part.strip() for part in args.rules.split(",") if part.strip())
    bench = PeftBench(preset=args.preset, rules=rules, rounds=args.rounds, overrides=tuple(args.overrides))
    out = args.out or f"bench/peft-{bench.preset}"
    run_peft_bench(bench, out)
    print(f"wrote {Path(out) / 'results.jsonl'}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    print("\n".join(presets()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``secure-fl``."""
    parser = argparse.ArgumentParser(prog="secure-fl", description="Federated fine-tuning of PEFT adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run the server and N parties in this process or on Ray (default preset: bbc-news)")
    _add_config_args(sim, default_preset="bbc-news")
    sim.add_argument("--out", metavar="DIR", help="run directory (default runs/<run-id>)")
    sim.add_argument("--backend", choices=("in-process", "ray"),
                     help="where the selected parties' work runs (default: simulation.backend, 'in-process')")
    sim.add_argument("--ray-address", metavar="ADDR",
                     help="Ray cluster to join with --backend ray (default: simulation.ray_address; '' starts a local one)")
    sim.set_defaults(fn=_simulate)
    _add_provision(sub)
    aud = sub.add_parser("audit", help="write the privacy audit report of a run directory (report/privacy_report.*)")
    aud.add_argument("run_dir", metavar="RUN_DIR", help="the run's output directory")
    aud.add_argument(
        "--empirical", action="store_true",
        help="first re-run the config in simulation with canary clients (canary examples in DP-SGD for "
             "privacy.mode = dp-sgd; in RUN_DIR/empirical-audit) and write the "
             "one-run empirical epsilon lower bound to RUN_DIR/empirical_audit.json (exit 3 if it exceeds the theory)",
    )
    aud.add_argument("--canaries", type=int, metavar="N", help="canaries (default: privacy.audit_canaries)")
    aud.add_argument("--confidence", type=float, metavar="P", help="confidence of the lower bound (default 0.95)")
    aud.set_defaults(fn=_audit)
    show = sub.add_parser("config", help="print the resolved config as TOML (--explain: with meanings and defaults)")
    _add_config_args(show, default_preset="bbc-news")
    show.add_argument(
        "--explain", action="store_true",
        help="comment every key with its meaning and default, and mark the values that differ from it",
    )
    show.set_defaults(fn=_show_config)
    sub.add_parser("presets", help="list the bundled presets").set_defaults(fn=_presets)
    from secure_fl.bench.command import add_arguments as add_bench_arguments, run_from_args as run_bench

    bench = sub.add_parser("bench", help="evaluation harnesses that run many simulations and write a table")
    benches = bench.add_subparsers(dest="bench", required=True)
    robust = benches.add_parser(
        "robustness", help="defenses x attacks x secure modes: accuracy (and backdoor success) as table.md + table.json",
    )
    add_bench_arguments(robust)
    robust.set_defaults(fn=run_bench)
    peft = benches.add_parser(
        "peft", help="every PEFT rule on one workload: accuracy, bytes up per client, aggregation error (JSON lines)",
    )
    peft.add_argument("--preset", default="smoke", help="smoke, or bbc-news (10 clients, Dirichlet 0.5); default smoke")
    peft.add_argument("--rules", default="", metavar="A,B,...", help="rules to compare (default: every registered LoRA rule)")
    peft.add_argument("--rounds", type=int, metavar="R", help="rounds per run (default: the preset's)")
    peft.add_argument("--out", metavar="DIR", help="output directory (default bench/peft-<preset>)")
    peft.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value in every run (repeatable)")
    peft.set_defaults(fn=_bench_peft)
    args = parser.parse_args(argv)
    _setup_logging()
    return _guard(args.fn, args)


def _serve(args: argparse.Namespace) -> int:
    from secure_fl.transport.address import parse_address

    parse_address(args.address, what="--address", allow_port_zero=True)  # before the config and model load
    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--preset", args.preset), ("--set", args.overrides),
                                          ("--out", args.out)) if value]
        if given:
            raise ConfigError(f"--resume continues with the run's own config.toml in {args.resume}; "
                              f"drop {', '.join(given)}")
    elif not (args.config or args.preset) or not args.out:
        raise ConfigError("secure-fl-server needs --config FILE or --preset NAME, and --out DIR "
                          "(or --resume RUN_DIR to continue a run whose server was stopped)")
    tls = _server_tls(args)
    from secure_fl.api import Server

    if args.resume:
        server = Server.resume(args.resume, address=args.address, progress=True, tls=tls).start()
        config = server.federated.config
        print(f"run {server.run_id}: resumed from {args.resume} at round {server.federated.first_round} of "
              f"{config.run.rounds}; listening on {server.address}; waiting for {config.run.clients_per_round} clients",
              flush=True)
    else:
        config = _config(args)
        server = Server(config, address=args.address, out_dir=args.out, progress=True, tls=tls).start()
        print(f"run {server.run_id}: listening on {server.address}; waiting for {config.run.clients_per_round} clients",
              flush=True)
    try:
        result = server.wait(linger=args.linger)
    finally:
        server.stop()
    stopped = f" ({result.stop_reason})" if result.stopped_early else ""
    print(f"done: {len(result.metrics)} rounds{stopped}, final {result.headline}; outputs in {result.run_dir}")
    print(_privacy_summary(result.epsilon, config.privacy.delta, result.report_html))
    return 0


def server_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``secure-fl-server``."""
    parser = argparse.ArgumentParser(
        prog="secure-fl-server", description="Run the federated server over gRPC.",
        epilog="Evaluation runs on [run] device: auto (the GPU when torch sees one, else the CPU), cpu, cuda or "
        "cuda:N, e.g. --set run.device=cpu.",
    )
    _add_config_args(parser, default_preset=None, required=False)
    parser.add_argument("--address", required=True, metavar="HOST:PORT", help="where to listen, e.g. 127.0.0.1:50051")
    parser.add_argument("--out", metavar="DIR", help="run directory of a new run (must not hold a run)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR after its server stopped or was killed: its own config, the "
                        "last released round's adapter and state, the ledger replayed (nothing spent twice)")
    parser.add_argument("--linger", type=float, default=15.0, help="seconds to keep serving after the last round so clients learn the run is over")
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--tls", metavar="DIR", help="server bundle from secure-fl provision (DIR/server): TLS, and "
                          "mutual TLS unless --no-client-auth (required unless --insecure)")
    security.add_argument("--insecure", action="store_true",
                          help="plaintext gRPC, for loopback experiments only (warns; the privacy report flags it [high])")
    parser.add_argument("--no-client-auth", action="store_true",
                        help="with --tls: do not require party certificates (parties are then identified by the id they declare)")
    args = parser.parse_args(argv)
    _setup_logging()
    return _guard(_serve, args)


def _client(args: argparse.Namespace) -> int:
    from secure_fl.transport.address import check_id, parse_address

    tls = _client_tls(args)
    if args.client_id is None:
        if tls is None or tls.party is None:
            raise ConfigError("--client-id is required without a party bundle (--tls DIR/parties/<id>)")
        args.client_id = tls.party
    check_id(args.client_id, what="--client-id")  # before anything is loaded or printed
    parse_address(args.server, what="--server")
    config = _config(args)
    if args.lora_rank is not None:
        from secure_fl.peft_agg.ranks import with_lora_rank

        config = with_lora_rank(config, args.lora_rank)
    from secure_fl.api import run_client

    dataset = None
    if args.data:
        from secure_fl.data.sources import load_data_file

        dataset = load_data_file(config, args.data)
    where = f"{len(dataset)} local examples from {args.data}" if dataset is not None else "its partition of the configured data"
    print(f"client {args.client_id}: {where}; connecting to {args.server}", flush=True)
    summary = run_client(config, server=args.server, client_id=args.client_id, dataset=dataset, tls=tls)
    print(f"client {args.client_id}: trained rounds {summary.rounds_trained}; {summary.message}")
    return 0


def client_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``secure-fl-client``."""
    parser = argparse.ArgumentParser(
        prog="secure-fl-client", description="Run one federated client over gRPC.",
        epilog="Local training runs on this party's [run] device: auto (the GPU when torch sees one, else the CPU), "
        "cpu, cuda or cuda:N, e.g. --set run.device=cuda:1; each party reads its own config.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="address of secure-fl-server")
    _add_config_args(parser, default_preset=None)
    parser.add_argument("--client-id", metavar="ID",
                        help="this party's id (e.g. client-3); default: the party of the --tls bundle")
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--tls", metavar="DIR", help="party bundle from secure-fl provision (DIR/parties/<id>: mutual "
                          "TLS), or a directory with only ca.crt (TLS); required unless --insecure")
    security.add_argument("--insecure", action="store_true", help="plaintext gRPC, for loopback experiments only (warns)")
    parser.add_argument("--server-name", metavar="NAME",
                        help="the name the server's certificate carries, if not the --server host (e.g. localhost)")
    parser.add_argument("--data", metavar="PATH", help="local CSV/JSONL data (default: partition <index> of the configured dataset)")
    parser.add_argument(
        "--lora-rank", type=int, metavar="R",
        help="train a LoRA rank of its own, at most the server's peft.r (peft.rule='flora', or 'fedit' with "
        "[peft.rule_params] max_rank = the server's peft.r); peft.alpha is scaled to keep alpha / r",
    )
    args = parser.parse_args(argv)
    _setup_logging()
    return _guard(_client, args)


def _server_tls(args: argparse.Namespace) -> Any:
    """The server's TLS from ``--tls``; ``None`` with ``--insecure`` (warned); refused with neither."""
    from secure_fl.transport.credentials import ServerTLS

    if args.insecure:
        if args.no_client_auth:
            raise ConfigError("--no-client-auth belongs to --tls")
        print("warning: --insecure: plaintext gRPC, anyone on the path reads every message and any party can claim "
              "any client id; use it on loopback only (the privacy report flags the run [high])", file=sys.stderr)
        return None
    if not args.tls:
        raise ConfigError("secure-fl-server needs --tls DIR (a server bundle: secure-fl provision --out DIR --parties ...) "
                          "or --insecure for a loopback experiment")
    return ServerTLS.load(args.tls, require_client_auth=not args.no_client_auth)


def _client_tls(args: argparse.Namespace) -> Any:
    """The client's TLS from ``--tls``; ``None`` with ``--insecure`` (warned); refused with neither."""
    from secure_fl.transport.credentials import ClientTLS

    if args.insecure:
        print("warning: --insecure: plaintext gRPC, for loopback experiments only", file=sys.stderr)
        return None
    if not args.tls:
        raise ConfigError("secure-fl-client needs --tls DIR (its party bundle from secure-fl provision) or --insecure "
                          "for a loopback experiment")
    return ClientTLS.load(args.tls, server_name=args.server_name)


def _provision(args: argparse.Namespace) -> int:
    from secure_fl.transport.credentials import add_party, provision, revoke

    if args.revoke:
        revoke(args.out, args.revoke)
        print(f"revoked {args.revoke}: the server refuses it from its next call on ({args.out}/server/parties.json)")
        return 0
    if args.add_party:
        bundle = add_party(args.out, args.add_party, days=args.days)
        print(f"party bundle: {bundle} (give it to {args.add_party} only)")
        return 0
    parties = [p.strip() for p in (args.parties or "").split(",") if p.strip()]
    if args.clients:
        parties += [f"client-{i}" for i in range(args.clients)]
    if not parties:
        raise ConfigError("secure-fl provision needs --parties A,B,... or --clients N")
    made = provision(args.out, parties, server_names=tuple(args.server_name), server_ips=tuple(args.server_ip), days=args.days)
    print(f"CA: {made.root}/ca (keep ca.key offline); server bundle: {made.server}; "
          f"{len(made.parties)} party bundles under {made.root}/parties/ (files 0600)")
    return 0


def _add_provision(sub: Any) -> None:
    prov = sub.add_parser("provision", help="create a run's CA, the server's TLS bundle and one bundle per party")
    prov.add_argument("--out", required=True, metavar="DIR", help="where the CA and the bundles go")
    prov.add_argument("--parties", metavar="A,B,...", help="party ids to issue bundles for")
    prov.add_argument("--clients", type=int, metavar="N", help="also issue client-0 .. client-<N-1>")
    prov.add_argument("--server-name", action="append", default=[], metavar="NAME",
                      help="DNS name in the server certificate (repeat; default localhost)")
    prov.add_argument("--server-ip", action="append", default=[], metavar="IP",
                      help="IP address in the server certificate (repeat; default 127.0.0.1)")
    prov.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    prov.add_argument("--add-party", metavar="ID", help="issue one more party bundle with the existing CA")
    prov.add_argument("--revoke", metavar="ID", help="revoke a party: the server refuses it on every later call")
    prov.set_defaults(fn=_provision_defaults)


def _provision_defaults(args: argparse.Namespace) -> int:
    args.server_name = args.server_name or ["localhost"]
    args.server_ip = args.server_ip or ["127.0.0.1"]
    return _provision(args)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("secure_fl").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
