"""YAML recipes: many gen / decompose / compose jobs from one file, checked before anything runs.

    defaults: {model: tiny, width: 64, height: 64, steps: 2}
    output_dir: out/cups
    jobs:
      - name: cups
        gen:
          prompts: [glass cup, paper cup]
          seeds: [1, 2, 3]
          out: "{name}/{prompt_slug}-{seed}.png"
      - name: street
        gen: {fg_prompt: a cat, bg: "${other.blended}"}

Planning (`plan_recipe`) does everything that needs no model: schema
validation with line numbers, matrix expansion (prompts x seeds), output
templates, `${job.role}` references (unknown or cyclic ones are errors), path
checks (outputs stay inside output_dir), input files exist, outputs do not
collide. `run_plan` then runs the jobs on one `api.Session` (the base model is
loaded once; layer weights are merged in and restored between jobs by the
session). Under `accelerate launch`, `shard` splits the jobs between processes
so that jobs connected by references stay on one process.

Layout: `schema` (the YAML models), `paths` (output templates and the one
containment check every output path goes through), `planner` (one expander per
job kind, references, file checks), `graph` (run order, groups, sharding),
`runner` (resume decisions, running, results). The names below are loaded on
first use, so importing this package stays cheap.

Paths: inputs (images, prompt files) are relative to the recipe's folder;
`output_dir` is relative to the current folder; output templates are
relative to `output_dir` and may not leave it (unless allow_outside).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "schema": ("Recipe", "JobItem", "Defaults", "GenStep", "DecomposeStep", "ComposeStep", "ComposeLayer"),
    "paths": ("check_template", "render_template", "gen_outputs", "decompose_outputs", "OutputArea", "PLACEHOLDERS"),
    "planner": ("Job", "Plan", "plan_recipe", "prompt_of", "read_prompts_file", "MAX_JOBS"),
    "graph": ("shard", "owners"),
    "runner": ("Result", "preflight", "run_plan", "run_compose", "output_state", "remove_partial_writes"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["slug"] = "layerctl.core.naming"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _EXPORTS:  # a submodule: recipes.planner
        return importlib.import_module(f"layerctl.recipes.{name}")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'layerctl.recipes' has no attribute {name!r}")
    full = module if "." in module else f"layerctl.recipes.{module}"
    return getattr(importlib.import_module(full), name)
