"""``cxrnode models list|show|register|compare|promote|rollback|history|shadow|shadow-report``: the model registry.

The registry is ``[models] registry`` (default ``<data_dir>/models``, :mod:`models.catalog`); the
gate is :mod:`models.gate`. A running node notices a promotion or rollback before its next job
and serves the new champion from then on; likewise a shadow set or stopped with ``shadow``
(a challenger run beside the champion on live traffic, recorded, never sent: ``shadow-report``). Errors are one line on stderr and exit code 1; a
promotion the gate refuses also exits 1, naming the failing metric(s).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from node.cli.render import emit, table
from node.settings import Settings, load_settings


def _fail(message: str) -> SystemExit:
    return SystemExit(f"cxrnode: error: {message}")


def open_registry(settings: Settings) -> Any:
    """The node's :class:`models.catalog.ModelRegistry` (created and seeded on first use)."""
    from models.catalog import ModelRegistry

    return ModelRegistry(settings.models_registry_path, initial_arch=settings.worker.architecture)


def _guard(fn: Any) -> Any:
    """One-line errors for what the registry, the weights and the data can refuse."""

    def run(args: argparse.Namespace) -> int:
        from models.catalog import RegistryError
        from models.data import DataError
        from models.registry import WeightsError

        try:
            return int(fn(args) or 0)
        except (RegistryError, WeightsError, DataError) as exc:
            raise _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    return run


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


_SUMMARY_KEYS = ("lung_dice_mean", "tb_auc", "sensitivity", "specificity", "val_dice_network_size", "val_auc",
                 "val_sensitivity", "val_specificity", "best_val_dice_network_size")


def metrics_summary(metrics: dict[str, Any], limit: int = 3) -> str:
    """``val_auc 0.893, val_sensitivity 0.915`` from a metrics.json: known keys first, numbers only."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in _SUMMARY_KEYS if k in numeric] + sorted(k for k in numeric if k not in _SUMMARY_KEYS)
    return ", ".join(f"{k} {numeric[k]:.4g}" for k in keys[:limit]) or "-"


def _entry_dict(entry: Any, in_service: bool, shadow: bool = False) -> dict[str, Any]:
    return {"ref": entry.ref, "slot": entry.slot, "stem": entry.stem, "name": entry.identity.name,
            "version": entry.identity.version, "arch": entry.arch, "sha256": entry.identity.sha256,
            "registered_at": entry.registered_at, "in_service": in_service, "shadow": shadow,
            "folder": str(entry.folder), "metrics": entry.metrics()}


def cmd_list(args: argparse.Namespace) -> int:
    reg = open_registry(load_settings(args.config))
    champions = set(reg.champion_refs().values())
    shadows = set(reg.shadow_refs().values())
    entries = reg.entries(args.slot)
    rows = [_entry_dict(e, e.ref in champions, e.ref in shadows) for e in entries]
    human = table(["", "ref", "slot", "arch", "registered", "sha256", "metrics"],
                  [["*" if r["in_service"] else "~" if r["shadow"] else "", r["ref"], r["slot"], r["arch"],
                    r["registered_at"], r["sha256"][:12], metrics_summary(r["metrics"])] for r in rows])
    emit(rows, args.json, human + f"\n\n* = in service, ~ = in shadow (recorded, never sent); registry {reg.root}")
    return 0


def _about(record: dict[str, Any], ref: str) -> bool:
    return ref in (record.get("from"), record.get("to"))


def cmd_show(args: argparse.Namespace) -> int:
    reg = open_registry(load_settings(args.config))
    entry = reg.entry(args.ref)
    champions = reg.champion_refs()
    out = _entry_dict(entry, champions.get(entry.slot) == entry.ref, reg.shadow_refs().get(entry.slot) == entry.ref)
    out.update(sidecar=entry.meta, data_summary=entry.data_summary(), card=entry.card(),
               history=[r for r in reg.history() if _about(r, entry.ref)])
    lines = [f"{entry.ref}{'  (in service)' if out['in_service'] else '  (in shadow)' if out['shadow'] else ''}",
             (f"  slot {entry.slot}, {entry.identity.name} {entry.identity.version} ({entry.arch}), "
              f"input {entry.meta.get('input_size')} px, threshold {entry.meta.get('threshold')}"),
             f"  sha256 {entry.identity.sha256}",
             f"  registered {entry.registered_at}, folder {entry.folder}",
             f"  data: {json.dumps(out['data_summary'], sort_keys=True)}",
             f"  metrics: {json.dumps(out['metrics'], sort_keys=True)}",
             "  history:"]
    lines += [f"    {_history_line(r)}" for r in out["history"]] or ["    -"]
    lines += ["", entry.card().rstrip()]
    emit(out, args.json, "\n".join(lines))
    return 0


def _history_line(r: dict[str, Any]) -> str:
    gate = r.get("gate")
    verdict = "" if gate is None else (" gate passed" if gate.get("passed") else
                                       f" gate failed on {', '.join(gate.get('failed', []))}")
    return (f"{r['when']}  {r['action']:<8} {r['slot']:<9} {r.get('from') or '-'} -> {r['to'] or '-'}  by {r['by']}"
            f"{' FORCED' if r.get('forced') else ''}{verdict}: {r['why']}")


def cmd_history(args: argparse.Namespace) -> int:
    reg = open_registry(load_settings(args.config))
    records = [r for r in reg.history() if args.slot is None or r["slot"] == args.slot]
    emit(records, args.json, "\n".join(_history_line(r) for r in records) or "no history")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    reg = open_registry(load_settings(args.config))

    def read_json(path: str | None) -> dict[str, Any] | None:
        if path is None:
            return None
        try:
            value = json.loads(open(path, encoding="utf-8").read())  # noqa: SIM115
        except (OSError, json.JSONDecodeError) as exc:
            raise _fail(f"{path}: {exc}") from None
        if not isinstance(value, dict):
            raise _fail(f"{path}: expected a JSON object")
        return value

    card = None
    if args.card:
        try:
            card = open(args.card, encoding="utf-8").read()  # noqa: SIM115
        except OSError as exc:
            raise _fail(f"{args.card}: {exc.strerror}") from None
    entry = reg.register(args.weights_dir, args.stem, card=card, data_summary=read_json(args.data_summary),
                         metrics=read_json(args.metrics))
    emit(_entry_dict(entry, False), args.json,
         f"registered {entry.ref} ({entry.slot}, sha256 {entry.identity.sha256[:12]}) in {entry.folder}; "
         f"not in service: cxrnode models promote {entry.ref} --data DIR --why TEXT")
    return 0


def _compare(settings: Settings, reg: Any, args: argparse.Namespace, against: str | None) -> dict[str, Any]:
    from models.gate import compare

    return compare(reg, args.challenger, args.data, against=against, split=args.split, device=args.device,
                   margins=settings.models.margins, n_boot=settings.models.bootstrap_samples,
                   progress=not args.json and sys.stderr.isatty())


def cmd_compare(args: argparse.Namespace) -> int:
    from models.gate import format_report

    settings = load_settings(args.config)
    reg = open_registry(settings)
    report = _compare(settings, reg, args, args.against)
    emit(report, args.json, format_report(report))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from models.gate import format_report, summary

    settings = load_settings(args.config)
    reg = open_registry(settings)
    if args.data is None and not args.force:
        raise _fail("promote needs --data DIR (the reference set the gate compares on), or --force")
    target = reg.entry(args.challenger)
    gate = None
    if args.data is not None:
        report = _compare(settings, reg, argparse.Namespace(**{**vars(args), "challenger": target.ref}), None)
        gate = summary(report)
        if not args.json:
            print(format_report(report))
        if not report["passed"] and not args.force:
            details = "; ".join(
                f"{m['label']} {m['challenger']:.4f} vs {m['against']:.4f} (drop {m['drop']:.4f} > margin {m['margin']:g})"
                if m["verdict"] == "fail" else f"{m['label']} not measurable on this data"
                for m in report["metrics"] if m["verdict"] != "pass")
            if args.json:
                print(json.dumps({"promoted": False, "gate": report}, indent=2))
            raise SystemExit(f"cxrnode: error: refused: {target.ref} is worse than {report['against']['ref']} "
                             f"beyond the margin on {', '.join(report['failed'])}: {details}. "
                             f"Nothing changed; --force promotes it anyway (recorded as forced)")
    record = reg.promote(target.ref, by=_who(args), why=args.why, force=args.force, gate=gate)
    emit({"promoted": True, **record}, args.json,
         f"{record['slot']}: now {record['to']} (was {record['from']})"
         + (" FORCED" if record["forced"] else "") + "; a running node switches before its next job")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reg = open_registry(load_settings(args.config))
    record = reg.rollback(args.slot, by=_who(args), why=args.why)
    emit(record, args.json, f"{record['slot']}: now {record['to']} (was {record['from']}); "
                            "a running node switches before its next job")
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    if (args.ref is None) == (not args.off):
        raise _fail("name the model to run in shadow (REF), or --off")
    reg = open_registry(load_settings(args.config))
    records = reg.set_shadow(None if args.off else args.ref, by=_who(args), why=args.why or "", slot=args.slot)
    shadows = reg.shadow_refs()
    lines = [f"{r['slot']}: shadow {r['to'] or 'off'} (was {r['from'] or 'none'})" for r in records] or ["nothing changed"]
    lines.append(("shadows: " + ", ".join(f"{s} {ref}" for s, ref in sorted(shadows.items())) if shadows
                  else "no shadow runs") + "; a running node switches before its next job")
    emit({"changed": records, "shadows": shadows}, args.json, "\n".join(lines))
    return 0


def cmd_shadow_report(args: argparse.Namespace) -> int:
    from node.cli.admin import _db
    from node.cli.audit import parse_since
    from node.cli.render import iso
    from node.queue import repository
    from node.worker.shadow import report

    since = parse_since(args.since) if args.since else None
    groups = report(repository.shadow_results(_db(args), since))
    out = {"since": iso(since) if since else None, "shadows": groups}

    def num(value: Any, fmt: str = ".4f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = []
    for g in groups:
        lines += [f"{g['shadow_ref']} (beside {', '.join(g['champions'])}; {g['first']} .. {g['last']})",
                  f"  jobs compared {g['jobs_compared']}, errors {g['errors']}"
                  + (f" (last: {g['last_error']})" if g["last_error"] else ""),
                  (f"  lung Dice vs champion: mean {num(g['dice_mean'])}, min {num(g['dice_min'])}; lowest jobs "
                   f"{', '.join(map(str, g['dice_lowest_jobs'])) or '-'}"),
                  (f"  TB score mean |difference| {num(g['tb_score_mean_abs_diff'])}; calls agree "
                   f"{g['agreed']}/{g['jobs_compared']} ({num(g['agreement_rate'] and 100 * g['agreement_rate'], '.1f')} %), "
                   f"champion normal/shadow abnormal {g['champion_normal_shadow_abnormal']}, "
                   f"champion abnormal/shadow normal {g['champion_abnormal_shadow_normal']}")]
    emit(out, args.json, "\n".join(lines) or "no shadow results" + (f" since {iso(since)}" if since else ""))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    models = sub.add_parser("models", help="the model registry: list, compare, promote, roll back").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("list", parents=[common], help="registered models; * = in service")
    p.add_argument("--slot", choices=("segmenter", "tb"))
    p.set_defaults(func=_guard(cmd_list))
    p = models.add_parser("show", parents=[common], help="one model: sidecar, card, data, metrics, history")
    p.add_argument("ref", help="<stem>@<version> (or a unique prefix, or 8+ digits of its sha256)")
    p.set_defaults(func=_guard(cmd_show))
    p = models.add_parser("history", parents=[common], help="every seed, promotion and rollback")
    p.add_argument("--slot", choices=("segmenter", "tb"))
    p.set_defaults(func=_guard(cmd_history))
    p = models.add_parser("register", parents=[common],
                          help="register weights written by cxrnode train (STEM.pt, STEM.json, SHA256SUMS)")
    p.add_argument("weights_dir", metavar="DIR")
    p.add_argument("stem", metavar="STEM", help="file stem, e.g. lung-unet or tb-scorer")
    p.add_argument("--card", metavar="FILE.md", help="model card (default: one generated from the sidecar)")
    p.add_argument("--data-summary", metavar="FILE.json", help="what it was trained on")
    p.add_argument("--metrics", metavar="FILE.json", help="its metrics (e.g. cxrnode evaluate --json)")
    p.set_defaults(func=_guard(cmd_register))
    for name, help_text in (("compare", "a challenger against the model in service, paired, with 95% CIs"),
                            ("promote", "put a model in service if the gate passes (or --force)")):
        p = models.add_parser(name, parents=[common], help=help_text)
        p.add_argument("challenger", metavar="REF")
        p.add_argument("--data", metavar="DIR", required=name == "compare",
                       help="reference set: a folder with index.csv (the same for every comparison)")
        p.add_argument("--split", help="only this split of --data (default: every case)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        if name == "compare":
            p.add_argument("--against", metavar="REF", help="default: the model in service for the challenger's slot")
            p.set_defaults(func=_guard(cmd_compare))
        else:
            p.add_argument("--force", action="store_true",
                           help="promote even if the gate fails or without --data (recorded as forced)")
            p.add_argument("--why", required=True, help="the reason, recorded in the history")
            p.add_argument("--by", help="who promotes (default: $USER)")
            p.set_defaults(func=_guard(cmd_promote))
    p = models.add_parser("rollback", parents=[common], help="put the previous model of a slot back in service")
    p.add_argument("slot", choices=("segmenter", "tb"))
    p.add_argument("--why", required=True, help="the reason, recorded in the history")
    p.add_argument("--by", help="who rolls back (default: $USER)")
    p.set_defaults(func=_guard(cmd_rollback))
    p = models.add_parser("shadow", parents=[common],
                          help="run a model beside the one in service on every job: recorded, never sent")
    p.add_argument("ref", metavar="REF", nargs="?", help="the model to run in shadow (replaces its slot's shadow)")
    p.add_argument("--off", action="store_true", help="stop the shadow (of --slot, default every slot)")
    p.add_argument("--slot", choices=("segmenter", "tb"))
    p.add_argument("--why", help="the reason, recorded in the history")
    p.add_argument("--by", help="who (default: $USER)")
    p.set_defaults(func=_guard(cmd_shadow))
    p = models.add_parser("shadow-report", parents=[common],
                          help="how the shadow agreed with the model in service, per shadow model")
    p.add_argument("--since", metavar="TIME",
                   help="ISO 8601 time (UTC unless it has an offset) or a duration ago: 24h, 30m, 1d")
    p.set_defaults(func=_guard(cmd_shadow_report))
