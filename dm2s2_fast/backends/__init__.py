"""The backends: one package each, imported lazily by ``dm2s2_fast.dispatch``.

A backend registers itself on import: ``dispatch.register_backend(name, Capability(...), unavailable)``
(``unavailable`` is why it cannot run here at all — a library that failed to load — or None), then
one kernel per op it implements, ``dispatch.register_kernel(op, name, limits=...)``, taking the op's
arguments as the op's contract passes them (``dm2s2_fast/ops/<op>.py``). ``limits`` returns every
reason the kernel cannot take a call that the capability cannot express (a head dim, a row width).

Rules (tests/test_architecture.py): a backend imports neither another backend nor the reference
model; helpers two backends share live in ``backends/common.py``. Adding one: docs/backends.md.
"""
