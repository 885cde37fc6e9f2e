"""`videonsa analyze`: what the sparse attention learned and what it costs (docs/analysis.md).

One module per subcommand (`gates`, `sinks`, `budget`, `context`, `latency`), each exposing `HELP`,
`add_arguments(parser)` and `run(args)`; `common` holds what they share (output folder, JSON and PNG writing,
model loading, video preparation, capturing the attention layers' inputs) and `report` writes `report.html`.
Importing this package or a subcommand module loads no heavy library: torch and the model code are imported
inside `run`, so `videonsa --help` stays fast.
"""
