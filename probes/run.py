"""The command line: `python -m probes.run SUBCOMMAND ...`.

A thin shell: each subcommand parses its flags, calls one library function and prints the result
(a table, or one JSON object with `--json`). User errors (`ProbesError`) print one line on stderr
and exit with code 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from probes.errors import ProbesError
from probes.jsonable import jsonable

EXIT_USER_ERROR = 2


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in tiny-reasoner and its sample traces",
        description=(
            "Load the built-in `tiny-reasoner` (no download), read its 200 sample traces, tokenize "
            "them into prompt/trajectory/scaffold/answer spans, label every token (reflection, "
            "delimiter, ordinary, ...), run the model through the TransformerLens bridge and print "
            "a summary: traces, tokens per category, greedy answer accuracy and answer NLL with the "
            "full trajectory and with the trajectory removed."
        ),
    )
    p.add_argument("--out", type=Path, default=None, help="folder for summary.json (created)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sample traces")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_demo)


def _add_categories(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "categories",
        help="count reflection / delimiter phrases in your traces with your tokenizer",
        description=(
            "Tokenize the traces with the given tokenizer, match the lexicon's reflection and "
            "delimiter phrases on the text (word boundaries, case-insensitive where sensible), map "
            "them to tokens, and print per-phrase counts and token totals per category. Use it to "
            "check the lexicon on your own data; extend it with --lexicon."
        ),
    )
    p.add_argument("--traces", type=Path, required=True, help="JSONL traces")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tiny-reasoner, a local model/tokenizer folder, or a hub id in the local HF cache",
    )
    p.add_argument(
        "--lexicon",
        type=Path,
        action="append",
        default=[],
        help="extra lexicon JSON merged into the built-in one (repeatable)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad JSONL line")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_categories)


def _add_model_run_args(p: argparse.ArgumentParser, *, out_help: str) -> None:
    """The flags every model-running command over a traces file shares (cache, lhat, updates)."""
    p.add_argument("--model", required=True,
                   help="tiny-reasoner, a local model folder, or a hub id in the local HF cache")
    p.add_argument("--traces", type=Path, required=True, help="JSONL traces")
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--limit", type=int, default=None, help="use only the first N traces")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="parameter dtype the model is loaded in (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="capture activations of every trace into an HDF5 cache (resumable)",
        description=(
            "Read JSONL traces, tokenize them into prompt/trajectory/scaffold/answer spans, label "
            "every token, run the model over each trace in chunks through its KV cache and write "
            "the chosen sites, stacked over layers as [tokens, layers, d], into one HDF5 file "
            "(schema: cache/SCHEMA.md). Every trace is committed on its own: a killed run keeps "
            "the complete traces and --resume finishes the rest."
        ),
    )
    _add_model_run_args(p, out_help="the .h5 file (its folder must exist)")
    p.add_argument(
        "--sites", nargs="+", default=None, metavar="SITE",
        help="components for every layer (resid_post, delta, attn_out, mlp_out, resid_pre, "
             "resid_mid, ...), explicit sites such as L3.resid_post, or global ones (embed, "
             "ln_final); space- or comma-separated (default: resid_post delta)",
    )
    p.add_argument("--positions", choices=["trajectory", "all"], default="trajectory",
                   help="tokens that get rows: the trajectory (default) or every token")
    p.add_argument("--dtype", choices=["float16", "float32", "bfloat16"], default="float16",
                   help="storage dtype of the sites (default float16)")
    p.add_argument("--resume", action="store_true",
                   help="add the missing traces to an existing file (complete ones are skipped)")
    p.add_argument("--chunk-size", type=int, default=512,
                   help="tokens per forward through the KV cache (default 512)")
    p.add_argument("--backend", choices=["auto", "hf", "bridge"], default="auto",
                   help="hf: plain HF forward (residual-level sites); bridge: TransformerLens "
                        "hooks (any site); auto: hf when the sites allow it")
    p.add_argument("--max-ram-mib", type=float, default=64.0,
                   help="per-trace output above this size is spooled to a temporary file beside "
                        "--out instead of RAM (default 64)")
    p.add_argument("--lexicon", type=Path, action="append", default=[],
                   help="extra lexicon JSON merged into the built-in one (repeatable)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad JSONL line")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_cache)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise an HDF5 cache: model, schema, traces, sites, shapes, sizes, completeness",
        description=(
            "Open a cache read-only (no model needed) and print its model, schema version, run "
            "config, number of complete and interrupted traces, and every site's dtype, shape "
            "[rows, layers, d], layers and size on disk."
        ),
    )
    p.add_argument("path", type=Path, help="the .h5 cache")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_inspect)


def _add_lhat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lhat",
        help="answer NLL after every trajectory prefix (RaML's L-hat), exact and fast, into a cache",
        description=(
            "For every trace compute L-hat_t, the mean NLL of the gold answer when the scaffold "
            "'\\n\\n**Final Answer**\\n\\\\boxed{' and the answer follow the first t trajectory "
            "tokens, for t = 0..T: one chunked prefill plus packed scaffold+answer copies with their "
            "own attention-mask blocks and position ids (equal to re-running every prefix). Writes "
            "lhat [T+1], lhat_delta, lhat_rho, lhat_log_ratio [T] and phrase labels into each trace "
            "group of --out (an existing cache gains them; resumable)."
        ),
    )
    _add_model_run_args(p, out_help="the .h5 cache (created or extended)")
    p.add_argument("--check-naive", type=int, default=0, metavar="K",
                   help="re-run K random prefixes per trace one forward each and report the "
                        "largest |fast - naive| (default 0)")
    p.add_argument("--no-thinking", action="store_true",
                   help="replace each trajectory by the NoThinking delimiter (write to another --out)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (default 512)")
    p.add_argument("--max-pack-tokens", type=int, default=512,
                   help="tokens per packed forward of scaffold+answer copies (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --check-naive prefixes")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.set_defaults(func=_cmd_lhat)


def _add_updates(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "updates",
        help="per-token implicit updates (attention M1-M4, MLP M5, gradient alignment M6/M7) at "
             "the answer query, into a cache",
        description=(
            "For every trace, at the position that predicts the first answer token (or averaged "
            "over every answer-predicting row with --answer-rows mean), compute per "
            "layer and per trajectory token the attention mass (mean over heads), the summed-head "
            "contribution and leave-one-out norms, the Dai outer-product norm (summed over KV "
            "heads), the Dherin MLP step sizes and consecutive cosine, the descent cosine and "
            "first-order loss change of each MLP step (M6) and each token's first-order effect on "
            "the answer loss through each layer's attention (M7; one forward and one backward per "
            "trace); store them as upd_* "
            "float32 [n_layers, T] in each trace group of --out (an existing cache gains them; "
            "resumable). --control random-init uses random weights of the same architecture "
            "(write to another --out)."
        ),
    )
    _add_model_run_args(p, out_help="the .h5 cache (created or extended)")
    p.add_argument("--control", choices=["none", "random-init"], default="none",
                   help="none: the trained weights (default); random-init: a seeded random "
                        "initialisation of the same architecture (needs its own --out)")
    p.add_argument("--seed", type=int, default=0, help="seed of --control random-init")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="store only these layers (increasing; default: all)")
    p.add_argument("--answer-rows", choices=["first", "mean"], default="first",
                   help="first: at the row predicting the first answer token (default); mean: at "
                        "every answer-predicting row, averaged over the rows (recorded in "
                        "upd_rows; one mode per cache: write the other to another --out)")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.set_defaults(func=_cmd_updates)


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="linear maps of the per-token implicit updates (pseudo-gradient map, static thought "
             "patch), fitted with scikit-learn",
        description=(
            "Needs the model. (a) Per layer: the exact leave-one-out change of the answer row's "
            "attention output caused by each trajectory token, regressed on the token's "
            "pseudo-gradient term (Dai dual form acting on the answer query): scalar implicit "
            "learning rate and a d x d map, against a value-only baseline; held-out R2 with "
            "GroupKFold by trace. (b) Per trace and layer: one static Ridge patch of W_gate / W_up "
            "replacing the exact per-query rank-1 patches of the scaffold + answer rows; held-out "
            "R2 over queries; and the answer NLL when it replaces the trajectory on the answer "
            "rows. dL-hat explained by the stored features runs in `compare`."
        ),
    )
    p.add_argument("--model", required=True,
                   help="tiny-reasoner, a local model folder, or a hub id in the local HF cache")
    p.add_argument("--traces", type=Path, required=True, help="JSONL traces")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--limit", type=int, default=None, help="use only the first N traces (>= 2)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: all)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="(a): at most N random trajectory tokens per trace")
    p.add_argument("--random-init-control", action="store_true",
                   help="repeat the fits on a seeded random-init model of the same architecture")
    p.add_argument("--no-nll", action="store_true", help="skip the static-patch answer NLL")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling, random init, bootstrap")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="parameter dtype the model is loaded in (default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_fit)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare reflection / delimiter / ordinary tokens on L-hat and on the per-token "
             "implicit updates, with controls (cache only)",
        description=(
            "From the cache alone (no model): per-trace aggregates of the chosen per-token metric "
            "for reflection, delimiter and ordinary tokens, each lexicon phrase, and the controls "
            "(paragraph-initial ordinary tokens, position-matched ordinary tokens, shuffled labels), "
            "compared across traces with bootstrap 95%% CIs, Wilcoxon signed-rank tests, Cliff's "
            "delta and Holm's correction; whether L-hat falls along the trajectory; RePro scores. "
            "For caches with update arrays (from `updates`): the same statistics per layer and "
            "pooled for every upd_* metric, with the shuffled-label null and (--control) a "
            "random-init model; with both, dL-hat regressed on the mechanistic features "
            "(held-out R2, partial R2 of the categories)."
        ),
    )
    p.add_argument("path", type=Path,
                   help="the .h5 cache with L-hat curves (from `lhat`) and/or update arrays "
                        "(from `updates`)")
    p.add_argument("--metric", default="abs_delta",
                   choices=["abs_delta", "delta", "rho", "lam", "abs_lam"],
                   help="per-token quantity: |dL|, dL, RaML's rho, log-ratio, |log-ratio|")
    p.add_argument("--unit", default="phrase", choices=["phrase", "first_token", "token"],
                   help="a phrase counts as a whole (default), by its first token, or per token")
    p.add_argument("--statistic", default="mean", choices=["mean", "median"],
                   help="per-trace aggregate (default mean)")
    p.add_argument("--raml-notebook", action="store_true",
                   help="RaML notebook's window for phrase changes (one token past the word)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of controls and bootstrap")
    p.add_argument("--plots", type=Path, default=None, help="folder for PNG plots")
    p.add_argument("--versus", type=Path, default=None,
                   help="a second cache of the same traces (e.g. from `lhat --no-thinking`): "
                        "compare the curves, paired by trace id")
    p.add_argument("--control", type=Path, default=None,
                   help="a cache of the same traces from `updates --control random-init`: repeat "
                        "the update comparisons on it and flag effects it reproduces")
    p.add_argument("--update-metrics", nargs="+", default=None, metavar="NAME",
                   help="upd_* arrays to compare (default: all in the cache)")
    p.add_argument("--update-unit", default="token", choices=["token", "first_token"],
                   help="update comparison: every token of a phrase (default) or its first token")
    p.add_argument("--layers", default="pooled", choices=["pooled", "all"],
                   help="update rows printed: pooled over layers (default) or every layer "
                        "(--json always has all)")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the regression of dL-hat on the mechanistic features")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m probes.run",
        description=(
            "trajectory-probes: how each token of a chain of thought moves a model toward its "
            "answer. Run `python -m probes.run SUBCOMMAND --help` for each subcommand."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    _add_demo(sub)
    _add_categories(sub)
    _add_cache(sub)
    _add_inspect(sub)
    _add_lhat(sub)
    _add_updates(sub)
    _add_fit(sub)
    _add_compare(sub)
    return parser


def _print_bad_lines(problems, *, limit: int = 10) -> None:
    for bad in problems[:limit]:
        print(f"skipped line {bad.line_no}: {bad.reason}", file=sys.stderr)
    if len(problems) > limit:
        print(f"... and {len(problems) - limit} more bad lines", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from probes.demo import format_summary, run_demo

    hf_logging.disable_progress_bar()

    summary = run_demo(out=args.out, limit=args.limit, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=None, sort_keys=True))
    else:
        print(format_summary(summary))
    return 0


def _cmd_categories(args: argparse.Namespace) -> int:
    from probes.categories import count_categories, format_category_table, load_lexicon
    from probes.models import load_tokenizer
    from probes.traces import read_traces, tokenize_traces

    traceset = read_traces(args.traces, strict=args.strict)
    _print_bad_lines(traceset.problems)
    lexicon = load_lexicon(extra=args.lexicon)
    tokenizer = load_tokenizer(args.tokenizer)
    tokenized, _too_long = tokenize_traces(traceset, tokenizer)
    counts = count_categories(tokenized, lexicon)
    counts["n_bad_lines"] = len(traceset.problems)
    if args.json:
        print(json.dumps(counts, ensure_ascii=False, sort_keys=True))
    else:
        print(format_category_table(counts))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from probes.capture import DEFAULT_COMPONENTS, CacheConfig, cache_traces, format_run

    hf_logging.disable_progress_bar()  # our own bar shows progress; keep errors one line

    sites = (
        tuple(s for item in args.sites for s in item.split(",") if s)
        if args.sites else DEFAULT_COMPONENTS
    )
    cfg = CacheConfig(
        sites=sites,
        positions=args.positions,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        limit=args.limit,
        lexicon=tuple(str(p) for p in args.lexicon),
        backend=args.backend,
        max_ram_mib=args.max_ram_mib,
        strict=args.strict,
    )
    try:
        result = cache_traces(
            args.model,
            args.traces,
            args.out,
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            device=args.device,
            model_dtype=args.model_dtype,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        print(f"interrupted: the complete traces in {args.out} are kept; rerun with --resume to "
              "finish", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, sort_keys=True))
    else:
        print(format_run(result))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from probes.capture import format_inspect, inspect_cache

    summary = inspect_cache(args.path)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True))
    else:
        print(format_inspect(summary))
    return 0


def _cmd_lhat(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from probes.lhat_run import LhatConfig, format_lhat_run, lhat_traces

    hf_logging.disable_progress_bar()
    cfg = LhatConfig(
        check_naive=args.check_naive, seed=args.seed, chunk_size=args.chunk_size,
        max_pack_tokens=args.max_pack_tokens, limit=args.limit, no_thinking=args.no_thinking,
    )
    result = lhat_traces(args.model, args.traces, args.out, cfg, device=args.device,
                         dtype=args.model_dtype, progress=not args.no_progress)
    print(format_lhat_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


def _cmd_updates(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from probes.updates_run import UpdatesConfig, format_updates_run, updates_traces

    hf_logging.disable_progress_bar()
    cfg = UpdatesConfig(control=args.control, seed=args.seed, limit=args.limit,
                        layers=tuple(args.layers) if args.layers else None,
                        answer_rows=args.answer_rows)
    result = updates_traces(args.model, args.traces, args.out, cfg, device=args.device,
                            dtype=args.model_dtype, progress=not args.no_progress)
    print(format_updates_run(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from probes.fits_run import FitConfig, fit_traces, format_fit_report

    hf_logging.disable_progress_bar()
    if args.out is not None and not args.out.parent.is_dir():
        raise ProbesError(f"--out {args.out}: folder {args.out.parent} does not exist")
    cfg = FitConfig(limit=args.limit, max_tokens=args.max_tokens,
                    layers=tuple(args.layers) if args.layers else None,
                    random_init_control=args.random_init_control, seed=args.seed,
                    n_boot=args.n_boot, nll=not args.no_nll)
    report = jsonable(fit_traces(args.model, args.traces, cfg, device=args.device,
                                  dtype=args.model_dtype))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report, ensure_ascii=False, sort_keys=True))
    else:
        print(format_fit_report(report))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from probes.compare_run import (
        CompareConfig,
        compare_cache,
        format_report,
        report_json,
    )

    cfg = CompareConfig(metric=args.metric, unit=args.unit, statistic=args.statistic,
                        raml_notebook=args.raml_notebook, n_boot=args.n_boot, seed=args.seed,
                        plots=args.plots, versus=args.versus, control=args.control,
                        update_metrics=(tuple(args.update_metrics) if args.update_metrics
                                        else None),
                        update_unit=args.update_unit, layers=args.layers, fit=not args.no_fit)
    report = compare_cache(args.path, cfg)
    if args.json:
        print(json.dumps(report_json(report), ensure_ascii=False, sort_keys=True))
    else:
        print(format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, return the exit code (2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ProbesError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
