"""Commands: one module per subcommand of `python -m probes.run` (its flags, its run, its report),
the shared flag groups (`flags`) and the one resumable per-trace write loop (`loop`)."""
