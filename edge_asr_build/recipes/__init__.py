"""Recipes: passes and reference matching put together into a shipped delta (`adapt`: dynamic context;
`compact`: factored model; `prune`: fewer decoder blocks). The shipped deltas live in `deltas/`."""
