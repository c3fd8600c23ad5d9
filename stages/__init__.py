"""The work of the pipeline: one module per stage, each a plain function `fn(cfg, inputs, out) -> stats`.

A stage reads the artifact folders of its upstream stages (`inputs`, keyed by stage name), writes its files into
`out`, and returns a small dict of stats for its manifest. It never imports Prefect and never decides whether to run.
"""
