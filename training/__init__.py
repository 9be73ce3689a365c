"""Training the project's own models, run from a checkout (not part of the installed `kvrag` package).

    python -m training.code_adapter --out DIR [...]   # the LoRA code adapter (bundled:code-e5-small)
    python -m training.compressor --out DIR [...]     # the distilled token classifier (bundled:compressor-e5-small)

Each takes the models folder as `--models-dir` (default `$KVRAG_HOME/models`) and writes a folder
with its weights and `recipe.json`; commit the result to `encoders/adapters/code-e5-small/` or
`rag/compress/models/compressor-e5-small/` (only the delta) for the package to load it.
"""
