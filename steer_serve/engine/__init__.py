"""Everything that runs inside vLLM lives in this package; its uses of vLLM internals are in ``vllm_internals``.

* ``vllm_internals`` — every vLLM internal relied on (version-checked on import): re-read on upgrade.
* ``plugin``      — the ``vllm.general_plugins`` entry point: registers the steerable architectures.
* ``architectures`` — one table per architecture: component name → module path and hook point.
* ``model``       — ``Steer<Arch>``: the stock vLLM model plus slot tables and hooks at the table's sites.
* ``step_state``  — per-step token→slot/coef buffers, filled once per engine step (pure numpy + torch).
* ``capture`` / ``interchange`` / ``condition`` — per-request captures, interchange source rows, CAST conditions.
* ``worker``      — worker extension: installs the per-step hook on the model runner, writes slot tables.
* ``engine``      — ``SteerEngine``: the AsyncLLM wrapper the API uses.
"""
