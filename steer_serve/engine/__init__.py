"""Everything that touches vLLM internals lives in this package (and only here).

* ``plugin``      — the ``vllm.general_plugins`` entry point: registers the steerable architectures.
* ``architectures`` — one table per architecture: component name → module path and hook point.
* ``model``       — ``Steer<Arch>``: the stock vLLM model plus slot tables and hooks at the table's sites.
* ``step_state``  — per-step token→slot/coef buffers, filled once per engine step (pure numpy + torch).
* ``worker``      — worker extension: installs the per-step hook on the model runner, writes slot tables.
* ``engine``      — ``SteerEngine``: the AsyncLLM wrapper the API uses.
"""
