"""The command line: one module per subcommand (`NAME`, `add_parser(sub)`, `run(args)`) and the
shared flag groups (`flags`).

`SUBCOMMANDS` is the one list of subcommands: `probes.run` builds the top-level help from it without
importing any subcommand (so `--help` is fast), and imports only the module of the subcommand run.
"""

SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ('demo', "probes.commands.demo",
     'run the whole pipeline on the built-in tiny-reasoner and its sample traces'),
    ('study', "probes.commands.study",
     'every analysis of your model on your traces into one folder: one store per stage, the '
     'comparisons, report.html (resumable)'),
    ('generate', "probes.commands.generate",
     'sample k graded trajectories per question from your model (or summarise trajectories)'),
    ('grade', "probes.commands.grade",
     'grade traces you have: extract each final answer and compare it with the gold answer'),
    ('categories', "probes.commands.categories",
     'count reflection / delimiter phrases in your traces with your tokenizer'),
    ('cache', "probes.commands.cache",
     'capture activations of every trace into an HDF5 cache (resumable)'),
    ('inspect', "probes.commands.inspect",
     'summarise an HDF5 cache: model, schema, traces, sites, shapes, sizes, completeness'),
    ('pack', "probes.commands.pack",
     'copy a cache (index + segments folder) into one self-contained HDF5 file'),
    ('lhat', "probes.commands.lhat",
     "answer NLL after every trajectory prefix (RaML's L-hat), exact and fast, into a cache"),
    ('updates', "probes.commands.updates",
     'per-token implicit updates (attention M1-M4, MLP M5, gradient alignment M6/M7) at the '
     'answer query, into a cache'),
    ('landscape', "probes.commands.landscape",
     'answer-loss landscape on weight planes, with the exact implicit-update path'),
    ('fit', "probes.commands.fit",
     'linear maps of the per-token implicit updates (pseudo-gradient map, static thought '
     'patch), fitted with scikit-learn'),
    ('compare', "probes.commands.compare",
     'compare reflection / delimiter / ordinary tokens on L-hat and on the per-token implicit '
     'updates, with controls (cache only)'),
    ('report', "probes.commands.report",
     'one self-contained HTML report of a cache: identity, tables, plots, token heat maps'),
    ('efficiency', "probes.commands.efficiency",
     'trajectory efficiency from the L-hat curves, and paired variants of the same question '
     '(cache only)'),
    ('compare-models', "probes.commands.compare_models",
     'the same traces through several checkpoints sharing a tokenizer: L-hat curves, stability'
     ' and update magnitudes compared trace by trace (caches only)'),
    ('anchors', "probes.commands.anchors",
     'sentence-level anchors: chunks, receiver heads, attention suppression, resampling'),
    ('effects', "probes.commands.effects",
     "causal edits of single tokens' updates (real ΔL vs M7/M6: V7) and behaviour directions, "
     'into a cache'),
)
"""(name, module, one-line help) of each subcommand, in the order `--help` lists them."""

SUMMARIES: dict[str, str] = {name: summary for name, _, summary in SUBCOMMANDS}
"""The one-line help of each subcommand."""


def name_of(module: str) -> str:
    """The subcommand name of a command module (`probes.commands.compare_models` ->
    "compare-models"), from `SUBCOMMANDS`."""
    return next(name for name, path, _ in SUBCOMMANDS if path == module)
