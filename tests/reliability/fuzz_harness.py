"""The fuzz harness over the public API (issue #19; docs/reliability.md#the-fuzz-harness).

A seeded generator draws *cases*; case ``i`` of seed ``s`` is a pure function of ``(s, i)``, so any
case replays alone (``python bench/fuzz_long.py --seed s --case i``). Kinds of case:

- ``batch_valid``: a valid ragged batch (empty samples, missing modalities, every id dtype, fp64 /
  fp16 / bf16 features up to the feature bound, NumPy arrays and lists, strided views, truncation)
  through one constructor (``from_samples``, ``from_jagged``, ``from_padded`` or ``SequenceSet(...)``):
  the batch must hold exactly the intended values, and the fp32 reference model and every
  available backend's engine must match the fp64 reference within docs/numerics.md's bounds;
- ``batch_malformed``: the same with one thing wrong (an id out of range, NaN / huge features, a
  dtype, a shape, a length, a name, a device, a container), which must raise ``ValueError`` or
  ``TypeError`` naming what is wrong (the modality, the sample where one is to blame, the field);
- ``op_valid`` / ``op_malformed``: the public ops (``dm2s2_fast.ops``) on random valid arguments
  (every backend against the op's fp64 reference, 1e-5) and with one bad argument (a
  ``ValueError``/``TypeError`` naming it);
- ``raw_op``: the compiled CPU ops (``torch.ops.dm2s2_fast.*``) with one bad argument: they must
  refuse it (any exception naming it); these are the calls that can crash a process;
- ``weights``: an engine run, its model's weights changed (in place, through ``.data``,
  ``load_state_dict``, a new Parameter, a new ``convert``), run again: it must see the new weights;
- ``engine``: the engine and the reference model called with the wrong thing, and a float16 model
  with features beyond float16's range (refused) or within it (correct within the half bound).

Every case runs in a worker subprocess (so a crash is recorded, not fatal) with a per-case timeout
(a hang is recorded, and the worker restarted). Each case lands in one class:

    valid_correct, clean_refusal            the two good ones
    other_exception                         a valid case raised, or a refusal of the wrong type or
                                            not naming what is wrong
    crash                                   the worker died (a signal, an abort)
    accepted_malformed                      a malformed case passed
    wrong_result                            a valid case gave a result beyond the bound (NaN included)
    hang                                    the case ran past the timeout

``run(seed, cases)`` returns a ``Report``; tests/reliability/test_fuzz.py runs a bounded set in CI,
bench/fuzz_long.py the long run whose table is committed under bench/results/.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for _p in (TESTS, ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

CLASSES = ("valid_correct", "clean_refusal", "other_exception", "crash", "accepted_malformed", "wrong_result",
           "hang")
GOOD = ("valid_correct", "clean_refusal")
BAD = tuple(c for c in CLASSES if c not in GOOD)
KINDS = (("batch_valid", 30), ("batch_malformed", 44), ("op_valid", 8), ("op_malformed", 8), ("raw_op", 6),
         ("weights", 2), ("engine", 2))
FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
FP32_TOL = 1e-5
HALF_CAP = 2e-2


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"dm2s2-fuzz:{seed}:{index}")


def draw_kind(rng: random.Random) -> str:
    return rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]


# ============================================================================ the parent: runner
@dataclass
class Report:
    seed: int
    cases: int = 0
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)  # class -> cases
    by_kind: dict = field(default_factory=dict)  # kind -> Counter(class -> cases)
    failures: list = field(default_factory=list)  # (index, kind, class, detail) for every bad case

    def add(self, index: int, result: dict) -> None:
        cls, kind = result["cls"], result.get("kind", "?")
        self.cases += 1
        self.counts[cls] += 1
        self.by_kind.setdefault(kind, Counter())[cls] += 1
        if cls in BAD:
            self.failures.append((index, kind, cls, result.get("detail", "")))

    @property
    def bad(self) -> int:
        return sum(self.counts[c] for c in BAD)

    def table(self) -> str:
        """Markdown: cases per class, overall and per kind."""
        kinds = [k for k, _ in KINDS if k in self.by_kind]
        head = "| class | all | " + " | ".join(kinds) + " |"
        rule = "|---|---:|" + "---:|" * len(kinds)
        rows = [head, rule]
        for c in CLASSES:
            rows.append(f"| {c} | {self.counts[c]} | " + " | ".join(str(self.by_kind[k][c]) for k in kinds) + " |")
        rows.append(f"| **total** | {self.cases} | " + " | ".join(str(sum(self.by_kind[k].values())) for k in kinds)
                    + " |")
        return "\n".join(rows)

    def summary(self, failures: int = 20) -> str:
        lines = [f"seed {self.seed}: {self.cases} cases in {self.seconds:.1f} s", self.table()]
        for index, kind, cls, detail in self.failures[:failures]:
            lines.append(f"  case {index} [{kind}] {cls}: {detail[:400]}")
        if len(self.failures) > failures:
            lines.append(f"  ... and {len(self.failures) - failures} more")
        return "\n".join(lines)


class _Worker:
    def __init__(self, options: dict, startup_timeout: float):
        self.err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), str(HERE), env.get("PYTHONPATH", "")])
        if "TRITON_INTERPRET" not in env:
            env["TRITON_INTERPRET"] = "1"  # no GPU here; a GPU run sets it to 0 itself
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(options)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
                                     cwd=str(ROOT), start_new_session=True)
        self.buf = b""
        self.case: int | None = None
        self.started = 0.0
        line = self.readline(time.monotonic() + startup_timeout)
        if line is None or not json.loads(line).get("ready"):
            tail = self.stderr_tail()
            self.kill()
            raise RuntimeError(f"fuzz worker failed to start: {tail}")

    def readline(self, deadline: float) -> str | None:
        """The next protocol line, or None at EOF (the worker died) or past the deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def send(self, index: int) -> None:
        self.case, self.started = index, time.monotonic()
        self.proc.stdin.write(f"{index}\n".encode())
        self.proc.stdin.flush()

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            self.err.seek(0)
            return self.err.read().decode(errors="replace")[-n:]
        except Exception:
            return ""

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.err.close()


def run(seed: int, indices, *, workers: int = 2, threads: int = 1, timeout: float = 60.0,
        triton_every: int = 0, startup_timeout: float = 600.0, progress=None) -> Report:
    """Run cases ``indices`` of ``seed`` in ``workers`` subprocesses (``threads`` torch threads each);
    ``triton_every``: every n-th valid batch also runs the triton backend (0: never)."""
    indices = list(indices)
    options = {"seed": seed, "threads": threads, "triton_every": triton_every}
    report = Report(seed)
    start = time.monotonic()
    pending = list(reversed(indices))
    pool: list[_Worker] = []
    try:
        for _ in range(max(1, min(workers, len(indices)))):
            pool.append(_Worker(options, startup_timeout))
        for w in pool:
            if pending:
                w.send(pending.pop())
        while any(w.case is not None for w in pool):
            busy = [w for w in pool if w.case is not None]
            fds = {w.proc.stdout.fileno(): w for w in busy}
            wait = max(0.0, min(w.started + timeout for w in busy) - time.monotonic())
            ready, _, _ = select.select(list(fds), [], [], wait)
            now = time.monotonic()
            for w in list(busy):
                result = None
                if w.proc.stdout.fileno() in ready or b"\n" in w.buf:
                    line = w.readline(now + 0.5)
                    if line is not None:
                        result = json.loads(line)
                    elif w.proc.poll() is not None or not w.buf:
                        # EOF: the worker died inside the case
                        try:
                            w.proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            pass
                        if w.proc.poll() is not None:
                            result = {"cls": "crash", "kind": _kind_of(seed, w.case),
                                      "detail": f"worker exit {w.proc.returncode}: {w.stderr_tail()}"}
                if result is None and now - w.started > timeout:
                    result = {"cls": "hang", "kind": _kind_of(seed, w.case), "detail": f"> {timeout:.0f} s"}
                if result is None:
                    continue
                report.add(w.case, result)
                if progress is not None:
                    progress(report)
                if result["cls"] in ("crash", "hang"):
                    w.kill()
                    pool[pool.index(w)] = w = _Worker(options, startup_timeout)
                w.case = None
                if pending:
                    w.send(pending.pop())
    finally:
        for w in pool:
            try:
                w.proc.stdin.close()
            except Exception:
                pass
            w.kill()
    report.seconds = time.monotonic() - start
    report.failures.sort()
    return report


def _kind_of(seed: int, index: int) -> str:
    return draw_kind(case_rng(seed, index))


# ============================================================================ the worker
def _worker_main(options: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    fuzzer = Fuzzer(options)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        result = fuzzer.run(int(line))
        proto.write(json.dumps(result) + "\n")


def run_one(seed: int, index: int, **options) -> dict:
    """Case ``index`` of ``seed`` in this process (to debug one)."""
    return Fuzzer({"seed": seed, **options}).run(index)


class Malformed:
    """What a malformed case must raise: ``types``, with every entry of ``names`` in the message (an
    entry that is a tuple: any one of it)."""

    def __init__(self, *names, types=None, words=False):
        self.names = names
        self.types = types
        self.words = words  # match argument names as whole words ("k" is not the k of "kernel")


class _Pair(list):
    """A (values, lengths) or (padded, mask) pair as rendered: a list while a mutation edits it, a
    tuple when it reaches the constructor (a mutation that puts a plain list there keeps it)."""


def _mentions(msg: str, token: str, words: bool) -> bool:
    import re

    if words and re.fullmatch(r"\w+", token):
        return re.search(rf"(?<!\w){re.escape(token)}(?!\w)", msg) is not None
    return token in msg


class Fuzzer:
    """Worker side: the configs, models, fp64 oracles and engines, built once; ``run(i)`` runs case i."""

    def __init__(self, options: dict):
        import torch

        self.seed = int(options.get("seed", 0))
        self.triton_every = int(options.get("triton_every", 0))
        torch.set_num_threads(int(options.get("threads", 1)))
        # Uninitialised memory is NaN (integers: their largest value), as in the test suite: a kernel
        # that leaves an output element unwritten gives NaN, a wrong result, not a plausible one.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        import warnings

        warnings.simplefilter("ignore")
        import dm2s2_fast as dm
        from dm2s2_fast import Modality, dispatch
        from helpers import random_model, small_config

        self.torch, self.dm = torch, dm
        self.configs = [
            small_config("set"),
            small_config("modality"),
            small_config("set", hidden_size=16, num_heads=2, intermediate_size=24, max_positions=12,
                         layer_norm_eps=0.1, embedding_layer_norm_eps=1e-3, mra_hidden_size=8, head_hidden_size=4,
                         num_outputs=1, modalities=(Modality("img", "dense", input_dim=3), Modality("t", "tokens"),
                                                    Modality("cat", "categorical", num_embeddings=300))),
        ]
        self.models = [random_model(c, 100 + i) for i, c in enumerate(self.configs)]
        self.oracles = [copy.deepcopy(m).double() for m in self.models]
        self.backends = [b for b in ("torch", "cpp") if not dispatch.reasons(b, "add_layernorm", "cpu")]
        self.triton = self.triton_every > 0 and not dispatch.reasons("triton", "add_layernorm", "cpu")
        self.engines = [{b: dm.convert(m, backend=b) for b in self.backends} for m in self.models]
        self.half = None  # (fp16 model, its engine), built on first use
        # warm up: first calls load libraries and pack weights
        for i in range(len(self.configs)):
            batch = dm.SequenceSet.from_samples(self.configs[i], [{}])
            with torch.no_grad():
                for engine in self.engines[i].values():
                    engine(batch)

    # ------------------------------------------------------------------------ dispatch
    def run(self, index: int) -> dict:
        rng = case_rng(self.seed, index)
        kind = draw_kind(rng)
        torch = self.torch
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        try:
            cls, detail = getattr(self, f"case_{kind}")(rng, gen, index)
        except Exception:  # a bug in the harness itself: report it as such, loudly
            cls, detail = "other_exception", "HARNESS ERROR " + traceback.format_exc()[-1500:]
        return {"cls": cls, "kind": kind, "detail": detail}

    # ------------------------------------------------------------------------ outcome helpers
    @staticmethod
    def expect_refusal(fn, expected: Malformed, default_types) -> tuple[str, str]:
        types = expected.types or default_types
        try:
            fn()
        except types as exc:
            msg = str(exc)
            w = expected.words
            missing = [n for n in expected.names
                       if not (any(_mentions(msg, a, w) for a in n) if isinstance(n, tuple) else _mentions(msg, n, w))]
            if missing:
                return "other_exception", f"{type(exc).__name__} not naming {missing}: {msg[:300]}"
            return "clean_refusal", ""
        except Exception as exc:
            return "other_exception", f"{type(exc).__name__}: {str(exc)[:300]}"
        return "accepted_malformed", f"expected a refusal naming {list(expected.names)}"

    def _err(self, out, ref) -> float:
        """‖out − ref‖ / ‖ref‖ in fp64 (absolute where ‖ref‖ = 0); inf when out is not finite or of
        another shape."""
        torch = self.torch
        if tuple(out.shape) != tuple(ref.shape):
            return math.inf
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if not bool(torch.isfinite(out).all()):
            return math.inf
        denom = float(ref.norm())
        diff = float((out - ref).norm())
        return diff / denom if denom > 0 else diff

    # ------------------------------------------------------------------------ batches
    def _features(self, rng, gen, n, d, dtype):
        torch = self.torch
        limit = 6e4 if dtype == torch.float16 else 1e12
        scale = rng.choice([1.0] * 6 + [0.0, 1e-3, 1e3, 1e-30, 1e8, 1e11])
        if dtype == torch.float16:
            scale = min(scale, 1e3) if scale >= 1e-3 or scale == 0 else 1.0
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
        x = x.clamp(-limit / 1.01, limit / 1.01)
        if n and d and scale >= 1e8 and rng.random() < 0.3:  # on the bound (bf16 rounds 1e12 up: 9.9e11)
            edge = 65504.0 if dtype == torch.float16 else 9.9e11 if dtype == torch.bfloat16 else 1e12
            x[rng.randrange(n), rng.randrange(d)] = rng.choice([edge, -edge])
        return x.to(dtype)

    def _plan(self, rng, gen, cfg, *, need=None, too_long=False, malformed=False):
        """Per sample, per modality: the intended sequence (ids int64 [L], features [L, d] in the
        modality's dtype) or None (missing); plus dtypes and truncation. ``need``: a modality that
        must be present in some sample (for a malformed case to target)."""
        torch = self.torch
        B = rng.choice([0] + [1] * 3 + [2] * 3 + [3] * 3 + [4, 5, 7]) if need is None else rng.choice([1, 2, 3, 4, 5])
        maxp = cfg.max_positions
        truncate = (not malformed) and maxp <= 16 and rng.random() < 0.3
        dtypes = {}
        for m in cfg.modalities:
            if m.kind == "dense":
                dtypes[m.name] = rng.choice([torch.float32] * 5 + [torch.float64, torch.float16, torch.bfloat16])
            else:
                high = cfg.vocab_size if m.kind == "tokens" else m.num_embeddings
                choices = [torch.int64] * 4 + [torch.int32, torch.int16]
                if high <= 256:
                    choices.append(torch.uint8)
                if high <= 128:
                    choices.append(torch.int8)
                dtypes[m.name] = rng.choice(choices)
        seqs = []
        for b in range(B):
            row = {}
            for m in cfg.modalities:
                r = rng.random()
                if r < 0.35:
                    continue
                L = 1 if r < 0.55 else rng.randint(2, 7) if r < 0.85 else rng.randint(8, min(maxp, 24))
                if truncate and rng.random() < 0.3:
                    L = rng.randint(maxp + 1, maxp + 6)
                row[m.name] = self._content(rng, gen, cfg, m, L, dtypes[m.name])
            seqs.append(row)
        if need is not None and not any(need.name in row for row in seqs):
            b = rng.randrange(B)
            seqs[b][need.name] = self._content(rng, gen, cfg, need, rng.randint(1, 6), dtypes[need.name])
        long = None
        if too_long:
            target = need or rng.choice(cfg.modalities)
            b = rng.randrange(B)
            seqs[b][target.name] = self._content(rng, gen, cfg, target, rng.randint(maxp + 1, maxp + 4),
                                                 dtypes[target.name])
            long = (target.name, b)
        return {"B": B, "seqs": seqs, "dtypes": dtypes, "truncate": truncate, "long": long}

    def _content(self, rng, gen, cfg, m, L, dtype):
        torch = self.torch
        if m.kind == "dense":
            return self._features(rng, gen, L, m.input_dim, dtype)
        high = cfg.vocab_size if m.kind == "tokens" else m.num_embeddings
        ids = torch.randint(0, high, (L,), generator=gen)
        if L and rng.random() < 0.2:
            ids[rng.randrange(L)] = rng.choice([0, high - 1])
        return ids

    def _container(self, rng, t, allow_list=True):
        """``t`` as a tensor, a strided view, a NumPy array or a list (where those hold it exactly)."""
        torch = self.torch
        options = ["tensor", "tensor", "strided"]
        if t.dtype != torch.bfloat16:
            options.append("numpy")
        if allow_list and t.dtype in (torch.int64, torch.float32) and t.numel() < 200:
            options.append("list")
        how = rng.choice(options)
        if how == "numpy":
            return t.numpy()
        if how == "list":
            return t.tolist()
        if how == "strided" and t.dim() >= 1 and t.shape[0] > 0:
            big = torch.zeros((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
            big[::2] = t
            return big[::2]
        if how == "strided" and t.dim() == 2:
            return t.t().contiguous().t()
        return t

    def _empty(self, rng, m):
        torch = self.torch
        if m.kind == "dense":
            return rng.choice([None, [], torch.zeros(0, m.input_dim), torch.zeros(0), torch.zeros(0, m.input_dim).numpy()])
        return rng.choice([None, [], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32).numpy()])

    def _expected(self, cfg, plan):
        """Per modality: (lengths list, packed values fp64) the batch must hold."""
        torch = self.torch
        out = {}
        for m in cfg.modalities:
            pieces = []
            lens = []
            for row in plan["seqs"]:
                t = row.get(m.name)
                if t is None:
                    lens.append(0)
                    continue
                if plan["truncate"]:
                    t = t[: cfg.max_positions]
                lens.append(int(t.shape[0]))
                pieces.append(t.double())
            shape = (0, m.input_dim) if m.kind == "dense" else (0,)
            out[m.name] = (lens, torch.cat(pieces) if pieces else torch.zeros(shape, dtype=torch.float64))
        return out

    def _render(self, rng, gen, cfg, plan, ctor):
        """The constructor's input for ``plan``: samples (list of dicts), jagged ({name: [values,
        lengths]}), padded ({name: [data, mask]}) or direct ([values dict, lengths dict])."""
        torch = self.torch
        B, seqs = plan["B"], plan["seqs"]
        if ctor == "samples":
            samples = []
            for row in seqs:
                sample = {}
                for m in cfg.modalities:
                    t = row.get(m.name)
                    if t is None:
                        if rng.random() < 0.3:
                            sample[m.name] = self._empty(rng, m)
                        continue
                    sample[m.name] = self._container(rng, t)
                samples.append(sample)
            return samples
        packed = {}
        for m in cfg.modalities:
            present = [row.get(m.name) for row in seqs]
            if all(t is None for t in present) and rng.random() < 0.5:
                continue  # left out: missing in every sample
            packed[m.name] = present
        if not packed:  # a batch names one modality at least
            m = rng.choice(cfg.modalities)
            packed[m.name] = [None] * B
        if ctor in ("jagged", "direct"):
            out = {}
            for m in cfg.modalities:
                if m.name not in packed:
                    continue
                present = packed[m.name]
                dtype = plan["dtypes"][m.name]
                shape = (0, m.input_dim) if m.kind == "dense" else (0,)
                pieces = [t for t in present if t is not None]
                values = torch.cat(pieces) if pieces else torch.zeros(shape, dtype=dtype)
                lengths = torch.tensor([0 if t is None else t.shape[0] for t in present], dtype=torch.int64)
                lengths = rng.choice([lengths, lengths.to(torch.int32), lengths.tolist(), lengths.numpy()]) \
                    if B else rng.choice([lengths, []])
                out[m.name] = _Pair([self._container(rng, values), lengths])
            if ctor == "direct":
                return [{k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}]
            return out
        out = {}
        for m in cfg.modalities:
            if m.name not in packed:
                continue
            present = packed[m.name]
            dtype = plan["dtypes"][m.name]
            L = max([0] + [0 if t is None else t.shape[0] for t in present]) + rng.randint(0, 2)
            if m.kind == "dense":
                data = torch.randn(B, L, m.input_dim, generator=gen).to(dtype)
                if rng.random() < 0.2 and B and L:
                    data[:, :] = float("nan")  # masked-out garbage: never read
            else:
                high = cfg.vocab_size if m.kind == "tokens" else m.num_embeddings
                data = torch.randint(-5, high + 5, (B, L), generator=gen).to(torch.int64)
                if dtype in (torch.int16, torch.int32):
                    data = data.to(dtype)
            mask = torch.zeros(B, L, dtype=torch.bool)
            for b, t in enumerate(present):
                if t is None:
                    continue
                pos = sorted(rng.sample(range(L), t.shape[0]))
                data[b, pos] = t.to(data.dtype)
                mask[b, pos] = True
            out[m.name] = _Pair([self._container(rng, data, allow_list=False),
                                 self._container(rng, mask, allow_list=False)])
        return out

    def _construct(self, cfg, ctor, inputs, truncate, device=None):
        from dm2s2_fast import SequenceSet

        if ctor == "samples":
            if device is not None:
                return SequenceSet.from_samples(cfg, inputs, truncate=truncate, device=device)
            return SequenceSet.from_samples(cfg, inputs, truncate=truncate)
        if isinstance(inputs, dict):
            inputs = {k: tuple(v) if isinstance(v, _Pair) else v for k, v in inputs.items()}
        if ctor == "jagged":
            return SequenceSet.from_jagged(cfg, inputs, truncate=truncate)
        if ctor == "padded":
            return SequenceSet.from_padded(cfg, inputs, truncate=truncate)
        return SequenceSet(cfg, inputs[0], inputs[1], truncate=truncate)

    def _kappa(self, oracle_model, oracle_out) -> float:
        """The classifier head's condition number at this batch (tests/model/test_fuzz_configs.py):
        ‖|W₂| |gelu(W₁ r + b₁)| + |b₂|‖ / ‖logits‖, in fp64."""
        torch = self.torch
        import torch.nn.functional as F

        if not oracle_out.logits.numel():
            return 0.0
        with torch.no_grad():
            head = oracle_model.head
            activation = F.gelu(F.linear(oracle_out.pooled, head.hidden.weight, head.hidden.bias))
            magnitude = activation.abs() @ head.out.weight.abs().T + head.out.bias.abs()
            return float(magnitude.norm() / oracle_out.logits.norm().clamp_min(1e-300))

    def _bounds(self, model, oracle_model, batch, oracle_out):
        """docs/numerics.md's random-config rule: max(1e-5, 2 × the fp32 reference's own error), the
        logits also 64 κ 2⁻²⁴."""
        with self.torch.no_grad():
            own = model(batch)
        kappa = self._kappa(oracle_model, oracle_out)
        bounds, errors = {}, {}
        for f in FIELDS:
            e = self._err(getattr(own, f), getattr(oracle_out, f))
            errors[f] = e
            bounds[f] = max(FP32_TOL, 2 * e)
        bounds["logits"] = max(bounds["logits"], 64 * kappa * 2.0 ** -24)
        return bounds, errors

    def case_batch_valid(self, rng, gen, index):
        torch = self.torch
        i = rng.randrange(len(self.configs))
        cfg = self.configs[i]
        plan = self._plan(rng, gen, cfg)
        ctor = rng.choice(["samples", "jagged", "padded", "direct"])
        inputs = self._render(rng, gen, cfg, plan, ctor)
        where = f"{ctor} on config {i}, B={plan['B']}"
        try:
            batch = self._construct(cfg, ctor, inputs, plan["truncate"])
        except Exception as exc:
            return "other_exception", f"{where}: valid batch refused: {type(exc).__name__}: {str(exc)[:300]}"
        if batch.batch_size != plan["B"]:
            return "wrong_result", f"{where}: batch_size {batch.batch_size}"
        for name, (lens, values) in self._expected(cfg, plan).items():
            if batch.lengths[name].tolist() != lens:
                return "wrong_result", f"{where}: lengths of {name!r} {batch.lengths[name].tolist()} != {lens}"
            got = batch.values[name]
            if got.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
                return "wrong_result", f"{where}: ids of {name!r} are {got.dtype}, not int64"
            if tuple(got.shape) != tuple(values.shape) or not torch.equal(got.double(), values):
                return "wrong_result", f"{where}: values of {name!r} differ from the input"
        try:
            with torch.no_grad():
                oracle = self.oracles[i](batch)
                bounds, ref_err = self._bounds(self.models[i], self.oracles[i], batch, oracle)
                if any(not math.isfinite(e) for e in ref_err.values()):
                    return "wrong_result", f"{where}: the fp32 reference model: {ref_err}"
                engines = dict(self.engines[i])
                if self.triton and self.triton_every and index % self.triton_every == 0:
                    engines["triton"] = self.dm.convert(self.models[i], backend="triton")
                for name, engine in engines.items():
                    out = engine(batch)
                    for f in FIELDS:
                        e = self._err(getattr(out, f), getattr(oracle, f))
                        if not e <= bounds[f]:
                            return "wrong_result", f"{where}: {name} {f} err {e:.3g} > {bounds[f]:.3g}"
        except Exception as exc:
            return "other_exception", f"{where}: {type(exc).__name__}: {str(exc)[:300]} " + \
                traceback.format_exc()[-600:]
        return "valid_correct", ""

    # ------------------------------------------------------------------------ malformed batches
    def case_batch_malformed(self, rng, gen, index):
        torch = self.torch
        i = rng.randrange(len(self.configs))
        cfg = self.configs[i]
        ctor = rng.choice(["samples", "jagged", "padded", "direct"])
        m = rng.choice(cfg.modalities)
        mutations = [n for n, (ctors, kinds) in _BATCH_MUTATIONS.items()
                     if ctor in ctors and (kinds is None or m.kind in kinds)]
        name = rng.choice(mutations)
        plan = self._plan(rng, gen, cfg, need=m, too_long=(name == "too_long"), malformed=True)
        plan["truncate"] = False
        # the target: a sample where m is present (its first element's position, for content changes)
        present = [b for b, row in enumerate(plan["seqs"]) if m.name in row]
        b = rng.choice(present)
        inputs = self._render(rng, gen, cfg, plan, ctor)
        ctx = _Ctx(self, rng, gen, cfg, plan, ctor, inputs, m, b)
        expected = getattr(ctx, f"m_{name}")()
        config = cfg if ctx.config is _UNSET else ctx.config
        state = {"inputs": ctx.inputs}
        fn = lambda: self._construct(config, ctor, state["inputs"], False, ctx.device)  # noqa: E731
        cls, detail = self.expect_refusal(fn, expected, (ValueError, TypeError))
        return cls, (f"{name} on {ctor}, modality {m.name!r}, sample {b}: {detail}" if detail else "")

    # ------------------------------------------------------------------------ ops
    def case_op_valid(self, rng, gen, index):
        op = rng.choice(list(_OPS))
        args, _ = _op_args(self, rng, gen, op)
        from dm2s2_fast import ops

        fn = getattr(ops, op)
        reference = _reference(op)
        args64 = {k: (v.double() if hasattr(v, "is_floating_point") and v.is_floating_point() else v)
                  for k, v in args.items()}
        if op == "embed_layernorm" and args.get("out") is not None:
            args64["out"] = args["out"].double().clone()
        args32 = dict(args)
        if op == "embed_layernorm" and args.get("out") is not None:
            args32["out"] = args["out"].clone()
        try:
            ref = reference(**args64)
            own = reference(**args32)  # the definition in fp32: the accuracy fp32 allows on this draw
        except Exception as exc:
            return "other_exception", f"{op} reference: {type(exc).__name__}: {exc}"
        ref = ref if isinstance(ref, tuple) else (ref,)
        own = own if isinstance(own, tuple) else (own,)
        # docs/numerics.md's rule for random draws: max(1e-5, 2 x the fp32 reference's own error) (a
        # GELU output of one element deep in the tail is inaccurate in fp32 whoever computes it)
        bounds = [max(FP32_TOL, 2 * self._err(o, r)) for o, r in zip(own, ref)]
        if op in ("bias_gelu", "linear_bias_gelu"):
            # GELU of inputs deep in the negative tail is ~0: an output made only of those has a norm
            # far below its inputs', and fp32 GELU is accurate there only absolutely, to the erf
            # approximation's 5e-7 (numerics.md) times the input. Held to that where it is larger.
            x, b = args64["x"], args64["bias"]
            pre = x + b if op == "bias_gelu" else x @ args64["weight"].T + b
            denom = float(ref[0].norm())
            if denom > 0:
                bounds[0] = max(bounds[0], 5e-7 * float(pre.norm()) / denom)
        backends = list(self.backends)
        if self.triton and self.triton_every and index % max(1, self.triton_every // 10) == 0:
            backends.append("triton")
        for backend in backends:
            call = dict(args)
            if op == "embed_layernorm" and args.get("out") is not None:
                call["out"] = args["out"].clone()
            try:
                with self.torch.no_grad():
                    out = fn(**call, backend=backend)
            except Exception as exc:
                return "other_exception", f"{op} on {backend}: {type(exc).__name__}: {str(exc)[:300]}"
            out = out if isinstance(out, tuple) else (out,)
            for k, (o, r) in enumerate(zip(out, ref)):
                e = self._err(o, r)
                if not e <= bounds[k]:
                    return "wrong_result", f"{op} on {backend}, output {k}: err {e:.3g} > {bounds[k]:.3g} ({_describe(args)})"
        return "valid_correct", ""

    def case_op_malformed(self, rng, gen, index):
        from dm2s2_fast import ops

        op = rng.choice(list(_OPS))
        args, info = _op_args(self, rng, gen, op, malformed=True)
        expected, args, backend = _corrupt(self, rng, gen, op, args, info, raw=False)
        expected.words = True
        fn = getattr(ops, op)
        cls, detail = self.expect_refusal(lambda: fn(**args, backend=backend), expected, (ValueError, TypeError))
        return cls, (f"{op}: {detail} ({_describe(args)})" if detail else "")

    def case_raw_op(self, rng, gen, index):
        torch = self.torch
        if "cpp" not in self.backends:  # no compiled library here: the public op instead
            return self.case_op_malformed(rng, gen, index)
        op = rng.choice(_OPS)
        args, info = _op_args(self, rng, gen, op, malformed=True)
        expected, args, _ = _corrupt(self, rng, gen, op, args, info, raw=True)
        expected.words = True
        raw = getattr(torch.ops.dm2s2_fast, op)
        positional = _raw_positional(op, args)
        cls, detail = self.expect_refusal(lambda: raw(*positional), expected, (RuntimeError, ValueError, TypeError))
        return cls, (f"raw {op}: {detail} ({_describe(args)})" if detail else "")

    # ------------------------------------------------------------------------ weights
    def case_weights(self, rng, gen, index):
        torch, dm = self.torch, self.dm
        from helpers import random_model

        i = rng.randrange(len(self.configs))
        cfg = self.configs[i]
        model = random_model(cfg, rng.randrange(10 ** 6))
        backend = rng.choice(self.backends)
        library = None
        if backend == "cpp":  # force one GEMM library (each keeps its own prepacked weights), or none
            import dm2s2_fast.backends.cpp as cpp

            if hasattr(cpp, "set_gemm_library"):
                library = rng.choice([None, "onednn", "mkl", "blas"])
                cpp.set_gemm_library(library)
        try:
            return self._weights(rng, gen, cfg, model, backend, library)
        finally:
            if library is not None:
                cpp.set_gemm_library(None)

    def _weights(self, rng, gen, cfg, model, backend, library):
        torch, dm = self.torch, self.dm
        from helpers import random_model

        engine = dm.convert(model, backend=backend)
        plan = self._plan(rng, gen, cfg, need=cfg.modalities[0])
        batch = self._construct(cfg, "jagged", self._render(rng, gen, cfg, plan, "jagged"), plan["truncate"])
        how = rng.choice(["data", "inplace", "load_state_dict", "new_parameter", "copy", "reconvert_data"])
        with torch.no_grad():
            engine(batch)
            linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
            target = rng.choice(linears)
            new = torch.randn(target.weight.shape, generator=gen) * 0.3
            if how == "data":
                target.weight.data.copy_(new)
            elif how == "inplace":
                target.weight.mul_(-1.5)
            elif how == "copy":
                target.weight.copy_(new)
            elif how == "new_parameter":
                target.weight = torch.nn.Parameter(new)
            elif how == "load_state_dict":
                model.load_state_dict(random_model(cfg, rng.randrange(10 ** 6)).state_dict())
            else:  # a fresh convert after an update through .data
                target.weight.data.normal_(0.0, 0.3, generator=gen)
                engine = dm.convert(model, backend=backend)
            out = engine(batch)
            oracle_model = copy.deepcopy(model).double()
            oracle = oracle_model(batch)
            bounds, _ = self._bounds(model, oracle_model, batch, oracle)
        for f in FIELDS:
            e = self._err(getattr(out, f), getattr(oracle, f))
            if not e <= bounds[f]:
                return "wrong_result", (f"{backend} ({library or 'measured'} GEMM) after a weight change ({how}): "
                                        f"{f} err {e:.3g} (stale weights?)")
        return "valid_correct", ""

    # ------------------------------------------------------------------------ engine misuse, fp16
    def case_engine(self, rng, gen, index):
        torch, dm = self.torch, self.dm
        what = rng.choice(["other_config", "not_a_batch", "reference_not_a_batch", "half_huge", "half_valid"])
        i = rng.randrange(len(self.configs))
        cfg = self.configs[i]
        engine = self.engines[i][rng.choice(self.backends)]
        if what == "other_config":
            other = self.configs[2 if i < 2 else 0]  # other modalities (configs 0 and 1 share theirs)
            plan = self._plan(rng, gen, other, need=other.modalities[0])
            batch = self._construct(other, "jagged", self._render(rng, gen, other, plan, "jagged"), plan["truncate"])
            return self.expect_refusal(lambda: engine(batch), Malformed("config"), (ValueError, TypeError))
        if what in ("not_a_batch", "reference_not_a_batch"):
            target = engine if what == "not_a_batch" else self.models[i]
            thing = rng.choice([None, {}, [1, 2], "batch", torch.zeros(3)])
            return self.expect_refusal(lambda: target(thing), Malformed("SequenceSet"), (ValueError, TypeError))
        # a float16 model (the torch backend runs fp16 on the CPU)
        cfg = self.configs[0]
        if self.half is None:
            half = copy.deepcopy(self.models[0]).half()
            self.half = (half, dm.convert(half, backend="torch"))
        half, half_engine = self.half
        dense = [m for m in cfg.modalities if m.kind == "dense"][0]
        plan = self._plan(rng, gen, cfg, need=dense)
        for row in plan["seqs"]:
            if dense.name in row:
                row[dense.name] = torch.randn(row[dense.name].shape, generator=gen)
        if what == "half_huge":
            b = rng.choice([b for b, row in enumerate(plan["seqs"]) if dense.name in row])
            x = plan["seqs"][b][dense.name]
            x[rng.randrange(x.shape[0]), rng.randrange(x.shape[1])] = rng.choice([7e4, -1e6, 1e11])
            batch = self._construct(cfg, "samples", self._render(rng, gen, cfg, plan, "samples"), plan["truncate"])
            return self.expect_refusal(lambda: half_engine(batch), Malformed(f"'{dense.name}'", f"sample {b}", "float16"),
                                       (ValueError, TypeError))
        batch = self._construct(cfg, "samples", self._render(rng, gen, cfg, plan, "samples"), plan["truncate"])
        with torch.no_grad():
            oracle = self.oracles[0](batch)
            ref = half(batch)
            out = half_engine(batch)
        kappa = self._kappa(self.oracles[0], oracle)
        for f in FIELDS:
            e_ref = self._err(getattr(ref, f), getattr(oracle, f))
            # numerics.md's half rule, with a floor of 4 units of fp16 roundoff: a batch of 1-5 samples
            # has outputs of a handful of numbers, where the reference's own error can be ~0 by luck
            bound = max(2 * e_ref, FP32_TOL, 4 * 2.0 ** -11)
            if f == "logits":  # a few numbers, maybe by cancellation: fp16's roundoff scaled by κ
                bound = max(bound, 64 * kappa * 2.0 ** -11)
            bound = min(HALF_CAP, bound)
            e = self._err(getattr(out, f), getattr(oracle, f))
            if not e <= bound:
                return "wrong_result", f"float16 engine {f}: err {e:.3g} > {bound:.3g}"
        return "valid_correct", ""


# ============================================================================ batch mutations
_ALL = ("samples", "jagged", "padded", "direct")
_PACKED = ("jagged", "direct")
_IDS = ("tokens", "categorical")
_BATCH_MUTATIONS = {  # name -> (constructors, modality kinds or None for any)
    "id_high": (_ALL, _IDS), "id_negative": (_ALL, _IDS), "ids_float": (_ALL, _IDS), "ids_bool": (_ALL, _IDS),
    "ids_unsigned": (_ALL, _IDS), "ids_complex": (_ALL, _IDS), "ids_2d": (_ALL, _IDS),
    "feature_nonfinite": (_ALL, ("dense",)), "feature_huge": (_ALL, ("dense",)),
    "feature_beyond_fp32": (_ALL, ("dense",)), "feature_dim": (_ALL, ("dense",)),
    "feature_int": (_ALL, ("dense",)), "feature_float8": (_ALL, ("dense",)), "feature_complex": (_ALL, ("dense",)),
    "feature_rank": (_ALL, ("dense",)), "feature_zero_width": (_ALL, ("dense",)),
    "too_long": (_ALL, None), "unknown_name": (_ALL, None), "non_string_key": (_ALL, None),
    "not_array_like": (_ALL, None), "meta": (_ALL, None), "config": (_ALL, None), "container": (_ALL, None),
    "negative_length": (_PACKED, None), "lengths_sum": (_PACKED, None), "lengths_dtype": (_PACKED, None),
    "lengths_count": (_PACKED, None), "lengths_wrap": (_PACKED, None), "lengths_not_array": (_PACKED, None),
    "values_scalar": (_PACKED, None), "pair": (("jagged", "padded"), None), "key_mismatch": (("direct",), None),
    "no_modality": (("jagged", "direct"), None), "mask_dtype": (("padded",), None),
    "mask_shape": (("padded",), None), "padded_rank": (("padded",), None), "sample_not_dict": (("samples",), None),
    "device": (("samples",), None),
}


_UNSET = object()


class _Ctx:
    """One malformed batch: mutate ``inputs`` (the constructor's rendered input) for modality ``m``,
    sample ``b``; each ``m_<name>`` returns the ``Malformed`` the refusal must match."""

    def __init__(self, fz: Fuzzer, rng, gen, cfg, plan, ctor, inputs, m, b):
        self.fz, self.torch, self.rng, self.gen, self.cfg, self.plan = fz, fz.torch, rng, gen, cfg, plan
        self.ctor, self.inputs, self.m, self.b = ctor, inputs, m, b
        self.config = _UNSET  # a mutation may replace the config, even by None
        self.device = None
        self.q = f"'{m.name}'"
        self.high = cfg.vocab_size if m.kind == "tokens" else m.num_embeddings if m.kind == "categorical" else 0

    # --- access to the target modality's data as a tensor
    def _t(self, x):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x.clone()
        return torch.as_tensor(x.copy() if hasattr(x, "copy") and not isinstance(x, list) else x)

    def get(self):
        """The target's tensor: sample b's sequence, the packed values, or the padded data."""
        if self.ctor == "samples":
            return self._t(self.inputs[self.b][self.m.name])
        if self.ctor == "direct":
            return self._t(self.inputs[0][self.m.name])
        return self._t(self.inputs[self.m.name][0])

    def put(self, t):
        if self.ctor == "samples":
            self.inputs[self.b][self.m.name] = t
        elif self.ctor == "direct":
            self.inputs[0][self.m.name] = t
        else:
            self.inputs[self.m.name][0] = t

    def where(self, sample: bool):
        """What the refusal must name: the modality, and sample b where the check is per sample."""
        return (self.q, f"sample {self.b}") if sample else (self.q,)

    def per_sample(self) -> bool:
        return self.ctor == "samples"

    def element(self):
        """Index into get()'s tensor of one element of sample b (its first row)."""
        if self.ctor == "samples":
            return (0,)
        if self.ctor == "padded":
            mask = self._t(self.inputs[self.m.name][1])
            pos = int(self.torch.nonzero(mask[self.b])[0])
            return (self.b, pos)
        lengths = [len(row[self.m.name]) if self.m.name in row else 0 for row in self.plan["seqs"]]
        return (sum(lengths[: self.b]),)

    def set_element(self, value):
        t = self.get()
        if t.dtype in (self.torch.int8, self.torch.int16, self.torch.int32, self.torch.uint8):
            t = t.to(self.torch.int64)
        idx = self.element()
        if self.m.kind == "dense":
            idx = idx + (self.rng.randrange(self.m.input_dim),)
        t[idx] = value
        self.put(t)

    # --- mutations
    def m_id_high(self):
        self.set_element(self.high + self.rng.choice([0, 1, 1000]))
        return Malformed(*self.where(True), "out of range")

    def m_id_negative(self):
        self.set_element(self.rng.choice([-1, -7]))
        return Malformed(*self.where(True), "out of range")

    def _retype(self, dtype, *names):
        self.put(self.get().to(dtype))
        return Malformed(*self.where(self.per_sample()), *names)

    def m_ids_float(self):
        return self._retype(self.rng.choice([self.torch.float32, self.torch.float64]), "ids must be integers")

    def m_ids_bool(self):
        return self._retype(self.torch.bool, "bool")

    def m_ids_unsigned(self):
        dtype = self.rng.choice([self.torch.uint16, self.torch.uint32, self.torch.uint64])
        return self._retype(dtype, str(dtype).replace("torch.", ""))

    def m_ids_complex(self):
        return self._retype(self.torch.complex64, "complex")

    def m_ids_2d(self):
        self.put(self.get().unsqueeze(-1))
        return Malformed(*self.where(self.per_sample()), "1-D")

    def m_feature_nonfinite(self):
        self.set_element(self.rng.choice([float("nan"), float("inf"), -float("inf")]))
        return Malformed(*self.where(True), "not finite")

    def m_feature_huge(self):
        t = self.get()
        value = self.rng.choice([2e12, -5e13, 1e19, 1e30, -3e38])
        if t.dtype == self.torch.float16:
            self.put(t.float())
        self.set_element(value)
        return Malformed(*self.where(True), "1e+12")

    def m_feature_beyond_fp32(self):
        self.put(self.get().double())
        self.set_element(self.rng.choice([1e39, -1e300]))
        return Malformed(*self.where(True), "float32")

    def m_feature_dim(self):
        t = self.get()
        extra = self.torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype)
        self.put(self.torch.cat([t, extra], -1) if self.rng.random() < 0.5 else t[..., :-1])
        return Malformed(*self.where(self.per_sample()), "shape")

    def m_feature_int(self):
        return self._retype(self.rng.choice([self.torch.int64, self.torch.int32, self.torch.bool]), "floating point")

    def m_feature_float8(self):
        t = self.get().float().clamp(-400, 400)
        self.put(t.to(self.rng.choice([self.torch.float8_e4m3fn, self.torch.float8_e5m2])))
        return Malformed(*self.where(self.per_sample()), "float8")

    def m_feature_complex(self):
        return self._retype(self.torch.complex64, "complex")

    def m_feature_rank(self):
        t = self.get()
        self.put(t[..., 0] if self.rng.random() < 0.5 else t.unsqueeze(-1))
        return Malformed(*self.where(self.per_sample()), "shape")

    def m_feature_zero_width(self):
        t = self.get()
        self.put(self.torch.zeros(t.shape[:-1] + (0,), dtype=t.dtype))
        return Malformed(*self.where(self.per_sample()), ", 0)")

    def m_too_long(self):
        name, b = self.plan["long"]  # the one sequence longer than max_positions
        return Malformed(f"'{name}', sample {b}", "max_positions")

    def m_unknown_name(self):
        key = self.rng.choice(["colour", "Title", "", "image "])
        return self._add_key(key)

    def m_non_string_key(self):
        key = self.rng.choice([3, None, (1, 2), b"title", 2.5])
        return self._add_key(key)

    def _add_key(self, key):
        torch = self.torch
        ids = torch.tensor([1], dtype=torch.int64)
        B = self.plan["B"]
        if self.ctor == "samples":
            self.inputs[self.b][key] = [1]
            return Malformed(f"sample {self.b}", "unknown modality", repr(key))
        if self.ctor == "jagged":
            self.inputs[key] = [ids.repeat(B), [1] * B]
        elif self.ctor == "padded":
            self.inputs[key] = [torch.ones(B, 1, dtype=torch.int64), torch.ones(B, 1, dtype=torch.bool)]
        else:
            self.inputs[0][key] = ids.repeat(B)
            if self.rng.random() < 0.7:
                self.inputs[1][key] = [1] * B
        return Malformed("unknown modality", repr(key))

    def m_not_array_like(self):
        thing = self.rng.choice(["abc", object(), {"a": 1}, {1, 2}, b"xy", [1, None], [[1, 2], [3]]])
        if self.ctor == "padded" and self.rng.random() < 0.5:
            self.inputs[self.m.name][1] = thing
            return Malformed(self.q, "cannot make a tensor", "mask")
        self.put(thing)
        return Malformed(*self.where(self.per_sample()), "cannot make a tensor")

    def m_meta(self):
        torch = self.torch
        if self.ctor in ("jagged", "direct") and self.rng.random() < 0.4:
            lengths = self.inputs[self.m.name][1] if self.ctor == "jagged" else self.inputs[1][self.m.name]
            meta = torch.as_tensor(lengths, dtype=torch.int64).to("meta")
            if self.ctor == "jagged":
                self.inputs[self.m.name][1] = meta
            else:
                self.inputs[1][self.m.name] = meta
            return Malformed(self.q, "lengths", "meta")
        if self.ctor == "padded" and self.rng.random() < 0.5:
            self.inputs[self.m.name][1] = self._t(self.inputs[self.m.name][1]).to("meta")
            return Malformed(self.q, "mask", "meta")
        self.put(self.get().to("meta"))
        return Malformed(*self.where(self.per_sample()), "meta")

    def m_config(self):
        self.config = self.rng.choice([None, {"modalities": ()}, "ads", self.cfg.modalities])
        # (None, a dict, a name, the modalities: not a DM2S2Config)
        return Malformed("DM2S2Config", types=(TypeError,))

    def m_container(self):
        thing = self.rng.choice([None, "x", 3, (i for i in range(2)), self.torch.zeros(2)])
        if self.ctor == "samples":
            self.inputs = thing
            return Malformed("from_samples takes a list")
        if self.ctor == "direct":
            self.inputs = [thing, self.inputs[1]] if self.rng.random() < 0.5 else [self.inputs[0], thing]
            return Malformed("two dicts")
        self.inputs = list(self.inputs.items()) if self.rng.random() < 0.5 else thing
        return Malformed(f"from_{self.ctor} takes a dict")

    # jagged / direct lengths
    def _lengths(self):
        raw = self.inputs[self.m.name][1] if self.ctor == "jagged" else self.inputs[1][self.m.name]
        return self.torch.as_tensor(raw.copy() if hasattr(raw, "copy") and not isinstance(raw, list) else raw,
                                    dtype=self.torch.int64).clone()

    def _set_lengths(self, l):
        if self.ctor == "jagged":
            self.inputs[self.m.name][1] = l
        else:
            self.inputs[1][self.m.name] = l

    def m_negative_length(self):
        l = self._lengths()
        l[self.b] = -self.rng.choice([1, 3, 2 ** 40])
        self._set_lengths(l)
        return Malformed(*self.where(True), "negative")

    def m_lengths_sum(self):
        t = self.get()
        if self.rng.random() < 0.5:
            self.put(t[:-1])
        else:
            self.put(self.torch.cat([t, t[:1]]))
        return Malformed(self.q, ("lengths sum", "but there are only"))

    def m_lengths_dtype(self):
        l = self._lengths()
        choice = self.rng.choice(["float", "bool", "uint32", "2d", "complex"])
        bad = {"float": lambda: l.float(), "bool": lambda: l.bool(), "uint32": lambda: l.to(self.torch.uint32),
               "2d": lambda: l[:, None], "complex": lambda: l.to(self.torch.complex64)}[choice]()
        self._set_lengths(bad)
        return Malformed(self.q, "lengths")

    def m_lengths_count(self):
        keys = list(self.inputs.keys()) if self.ctor == "jagged" else list(self.inputs[1].keys())
        if len(keys) < 2:  # one modality: another sample count is just another (valid) batch; refuse a key instead
            return self.m_unknown_name()
        l = self._lengths()
        self._set_lengths(self.torch.cat([l, self.torch.zeros(1, dtype=l.dtype)]))
        return Malformed("lengths has", "samples")

    def m_lengths_wrap(self):
        l = self._lengths()
        l[self.b] = 2 ** 62
        self._set_lengths(l)
        return Malformed(*self.where(True), "but there are only")

    def m_lengths_not_array(self):
        self._set_lengths(self.rng.choice([None, "abc", object(), [None], {1: 2}]))
        return Malformed(self.q, "lengths")

    def m_values_scalar(self):
        self.put(self.rng.choice([self.torch.tensor(3), 3, 2.5]))
        return Malformed(self.q, "scalar")

    def m_pair(self):
        pair = self.inputs[self.m.name]
        first = pair[0] if not (isinstance(pair[0], list) and len(pair[0]) == 2) else self.get()  # a 2-list is a pair
        self.inputs[self.m.name] = self.rng.choice([first, tuple(pair) + (None,), {"values": pair[0]}, None])
        return Malformed(self.q, "pair")

    def m_key_mismatch(self):
        values, lengths = self.inputs
        if self.rng.random() < 0.5:
            del lengths[self.m.name]
        else:
            del values[self.m.name]
        return Malformed("same modalities")

    def m_no_modality(self):
        self.inputs = {} if self.ctor == "jagged" else [{}, {}]
        return Malformed("at least one modality")

    def m_mask_dtype(self):
        mask = self._t(self.inputs[self.m.name][1])
        dtype = self.rng.choice([self.torch.uint8, self.torch.int64, self.torch.float32])
        self.inputs[self.m.name][1] = mask.to(dtype)
        return Malformed(self.q, "mask", str(dtype))

    def m_mask_shape(self):
        mask = self._t(self.inputs[self.m.name][1])
        choice = self.rng.choice(["1d", "3d", "wider"])
        if choice == "1d":
            self.inputs[self.m.name][1] = mask.reshape(-1)
            return Malformed(self.q, "mask")
        if choice == "3d":
            self.inputs[self.m.name][1] = mask[..., None]
            return Malformed(self.q, "mask")
        self.inputs[self.m.name][1] = self.torch.cat([mask, self.torch.zeros(mask.shape[0], 1, dtype=self.torch.bool)], 1)
        return Malformed(self.q, "shape")

    def m_padded_rank(self):
        t = self.get()
        self.put(t.reshape(-1) if self.rng.random() < 0.5 else self.torch.tensor(1))
        return Malformed(self.q, "padded values")

    def m_sample_not_dict(self):
        self.inputs[self.b] = self.rng.choice([[1, 2], "title", None, self.torch.zeros(2), ("title", [1])])
        return Malformed(f"sample {self.b}", "expected a dict")

    def m_device(self):
        self.device = self.rng.choice(["nope", 3.5, "meta", "cuda", "cuda:7", "xla"])
        import torch

        if isinstance(self.device, str) and self.device.startswith("cuda") and torch.cuda.is_available():
            self.device = "nope"
        return Malformed("device")


# ============================================================================ ops
_OPS = ("add_layernorm", "linear_add_layernorm", "bias_gelu", "linear", "linear_bias_gelu", "set_attention",
        "intra_mra", "inter_mra", "mra_pool", "embed_layernorm")
_EPS = (0.0, 1e-12, 1e-5, 1e-3, 0.1, 1.0)


def _reference(op):
    import importlib

    module = importlib.import_module(f"dm2s2_fast.ops.{'mra' if 'mra' in op else op}")
    fn = getattr(module, f"{op}_reference")
    # positional references take keyword arguments by their parameter names
    return lambda **kw: fn(*[kw[k] for k in _SIGNATURES[op]])


_SIGNATURES = {
    "add_layernorm": ("x", "residual", "weight", "bias", "eps"),
    "linear_add_layernorm": ("x", "weight", "bias", "residual", "ln_weight", "ln_bias", "eps"),
    "bias_gelu": ("x", "bias"),
    "linear": ("x", "weight", "bias"),
    "linear_bias_gelu": ("x", "weight", "bias"),
    "set_attention": ("q", "k", "v", "cu_seqlens", "max_seqlen", "scale"),
    "intra_mra": ("h", "cu_seqlens_segment", "W", "c", "v"),
    "inter_mra": ("z", "cu_segments_per_sample", "U", "g", "u"),
    "mra_pool": ("h", "cu_seqlens_segment", "cu_segments_per_sample", "W", "c", "v", "U", "g", "u"),
    "embed_layernorm": ("positions", "type_ids", "position_table", "type_table", "weight", "bias", "eps", "ids",
                        "table", "dense", "out", "out_rows"),
}
# The argument every other is compared against (dtype, device): mutating it blames the others.
_ANCHOR = {"add_layernorm": "x", "linear_add_layernorm": "x", "bias_gelu": "x", "linear": "x",
           "linear_bias_gelu": "x", "set_attention": "q", "intra_mra": "h", "inter_mra": "z", "mra_pool": "h",
           "embed_layernorm": "position_table"}


def _describe(args: dict) -> str:
    parts = []
    for k, v in args.items():
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            parts.append(f"{k}={str(v.dtype).replace('torch.', '')}{list(v.shape)}@{v.device.type}")
        else:
            parts.append(f"{k}={v!r}"[:60])
    return ", ".join(parts)


def _groups(rng, gen, total_max=40, groups_max=6):
    import torch

    G = rng.choice([0, 1, 1, 2, 3, 4, groups_max])
    lengths = [rng.choice([0, 1, rng.randint(2, 9), rng.randint(10, 20)]) for _ in range(G)]
    cu = torch.tensor([0] + list(__import__("itertools").accumulate(lengths)), dtype=torch.int32)
    return cu, lengths


def _maybe_strided(rng, t):
    import torch

    if t.dim() == 2 and t.shape[0] > 1 and rng.random() < 0.2:
        big = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]  # row stride > width
    return t


def _op_args(fz: Fuzzer, rng, gen, op, malformed=False):
    """Random valid arguments of ``op`` (fp32, CPU) as a dict by parameter name, and notes on them."""
    import torch

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    info = {}
    N = rng.choice([0, 1, 2, 5, 13, 40]) if not malformed else rng.choice([2, 5, 13])
    eps = rng.choice(_EPS) if not malformed else rng.choice(_EPS[1:])
    if op in ("add_layernorm", "linear_add_layernorm"):
        d = rng.choice([1, 3, 8, 32, 65]) if not malformed else rng.choice([3, 8, 32])
        low = rng.random() < 0.3  # low-variance rows: eps dominates
        scale = 1e-3 if low else 1.0
        if op == "add_layernorm":
            args = {"x": _maybe_strided(rng, r(N, d, scale=scale)), "residual": r(N, d, scale=scale),
                    "weight": r(d) + 1, "bias": r(d), "eps": eps}
        else:
            k = rng.choice([1, 4, 16, 33])
            args = {"x": _maybe_strided(rng, r(N, k, scale=scale)), "weight": r(d, k, scale=0.3), "bias": r(d, scale=scale),
                    "residual": r(N, d, scale=scale), "ln_weight": r(d) + 1, "ln_bias": r(d), "eps": eps}
        if eps == 0.0 and d == 1:
            args["eps"] = 1e-5  # a one-element row has variance 0: eps 0 gives 0/0 (documented)
        return args, info
    if op == "bias_gelu":
        f = rng.choice([1, 5, 32, 70])
        return {"x": _maybe_strided(rng, r(N, f, scale=2)), "bias": r(f)}, info
    if op in ("linear", "linear_bias_gelu"):
        k, f = rng.choice([1, 4, 16, 33]), rng.choice([1, 5, 32])
        return {"x": _maybe_strided(rng, r(N, k)), "weight": r(f, k, scale=0.3), "bias": r(f)}, info
    if op == "set_attention":
        cu, lengths = _groups(rng, gen)
        if malformed and sum(lengths) == 0:
            cu, lengths = torch.tensor([0, 3, 5], dtype=torch.int32), [3, 2]
        n = sum(lengths)
        H, D = rng.choice([1, 2, 3]), rng.choice([1, 4, 8, 16, 33, 64])
        if rng.random() < 0.4:
            qkv = r(n, 3, H, D)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            q, k, v = r(n, H, D), r(n, H, D), r(n, H, D)
        longest = max(lengths, default=0)
        scale = rng.choice([None, None, 0.1, 1.0, D ** -0.5, -0.5, 0.0])
        return {"q": q, "k": k, "v": v, "cu_seqlens": cu, "max_seqlen": longest + rng.choice([0, 0, 3]),
                "scale": scale}, {"longest": longest}
    if op in ("intra_mra", "inter_mra", "mra_pool"):
        d, a = rng.choice([1, 4, 16, 32]), rng.choice([1, 3, 8])
        cu, lengths = _groups(rng, gen)
        if malformed and sum(lengths) == 0:
            cu, lengths = torch.tensor([0, 3, 5], dtype=torch.int32), [3, 2]
        n = sum(lengths)
        x = r(n, d)
        W, c, v = r(a, d, scale=0.5), r(a), r(a)
        if op == "intra_mra":
            return {"h": x, "cu_seqlens_segment": cu, "W": W, "c": c, "v": v}, info
        if op == "inter_mra":
            return {"z": x, "cu_segments_per_sample": cu, "U": W, "g": c, "u": v}, info
        S = len(lengths)
        cuts = sorted(rng.choice(range(S + 1)) for _ in range(rng.randint(0, 3)))
        per = torch.tensor([0] + cuts + [S], dtype=torch.int32)
        a2 = rng.choice([1, 3, 8])
        return {"h": x, "cu_seqlens_segment": cu, "cu_segments_per_sample": per, "W": W, "c": c, "v": v,
                "U": r(a2, d, scale=0.5), "g": r(a2), "u": r(a2)}, info
    # embed_layernorm
    d = rng.choice([1, 4, 16, 32]) if not malformed else rng.choice([4, 16])
    n = N
    P, T = rng.choice([4, 64]), rng.choice([1, 3])
    args = {"positions": torch.randint(0, P, (n,), generator=gen).to(rng.choice([torch.int64, torch.int32])),
            "type_ids": torch.randint(0, T, (n,), generator=gen), "position_table": r(P, d),
            "type_table": r(T, d), "weight": r(d) + 1, "bias": r(d), "eps": eps if d > 1 else 1e-5,
            "ids": None, "table": None, "dense": None, "out": None, "out_rows": None}
    if rng.random() < 0.5 or malformed:
        R = rng.choice([1, 7, 101])
        args["ids"] = torch.randint(0, R, (n,), generator=gen).to(rng.choice([torch.int64, torch.int32]))
        args["table"] = r(R, d)
        if malformed:
            args["dense"] = None
    else:
        args["dense"] = _maybe_strided(rng, r(n, d))
    if rng.random() < 0.6 or malformed:
        total = n + rng.choice([0, 2])
        args["out"] = r(total, d)  # rows out_rows does not name keep this fill, in every backend
        args["out_rows"] = torch.randperm(total, generator=gen)[:n].to(rng.choice([torch.int64, torch.int32]))
    return args, {"P": P, "T": T}


def _corrupt(fz: Fuzzer, rng, gen, op, args, info, raw: bool):
    """One bad argument: returns (Malformed, args, backend). ``raw``: for the compiled op (which
    takes every argument positionally, and has no ``backend``)."""
    import torch

    args = dict(args)
    backend = "auto"
    names = [k for k in _SIGNATURES[op] if args.get(k) is not None or k in ("eps", "scale", "max_seqlen")]
    tensors = [k for k in names if isinstance(args.get(k), torch.Tensor)]
    anchor = _ANCHOR[op]
    offsets = [k for k in tensors if k.startswith("cu_")]
    indices = [k for k in tensors if k in ("positions", "type_ids", "ids", "out_rows")]
    floats = [k for k in tensors if k not in offsets and k not in indices]
    choices = ["ndim", "int_dtype", "shape", "meta"]
    if offsets:
        choices += ["offsets"] * 2
    if indices:
        choices += ["index"] * 2
    if "eps" in args:
        choices += ["eps"] * 2
    if op == "set_attention":
        choices += ["scale", "scale", "max_seqlen"]
    if op == "embed_layernorm":
        choices += ["duplicate_rows", "alias", "alias"] + ([] if raw else ["out_alone", "ids_alone"])
    if not raw:
        choices += ["backend", "not_a_tensor"]
    what = rng.choice(choices)
    if what == "eps":
        args["eps"] = rng.choice([-1e-3, -1.0, float("nan"), float("inf"), 1e39] + ([] if raw else ["tiny", None]))
        return Malformed("eps"), args, backend
    if what == "scale":
        args["scale"] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e39] + ([] if raw else ["x"]))
        if raw:
            args["max_seqlen"] = info["longest"]
        return Malformed("scale"), args, backend
    if what == "max_seqlen":
        if info["longest"] >= 1 and rng.random() < 0.6:
            args["max_seqlen"] = info["longest"] - 1
        else:
            args["max_seqlen"] = -1 if raw else rng.choice(["x", 2.5, None])
            if raw and info["longest"] == 0:
                args["max_seqlen"] = -1
        return Malformed("max_seqlen"), args, backend
    if what == "backend":
        return Malformed("backend"), args, rng.choice(["nope", 3, None, "CPP"])
    if what == "not_a_tensor":
        k = rng.choice(tensors)
        args[k] = rng.choice([args[k].tolist(), "x", 3] + ([None] if k not in ("ids", "table", "dense") else []))
        if op == "embed_layernorm" and k in ("ids", "table", "dense", "out", "out_rows") and args[k] is None:
            return Malformed(("give either", "go together")), args, backend
        return Malformed(k), args, backend
    if what == "ndim":
        k = rng.choice(tensors)
        args[k] = args[k].unsqueeze(0)
        return Malformed(_blame(op, k, raw)), args, backend
    if what == "int_dtype":
        k = rng.choice(floats)
        args[k] = (args[k] * 4).to(rng.choice([torch.int64, torch.int32]))
        return Malformed(_blame(op, k, raw)), args, backend
    if what == "shape":
        k = rng.choice([f for f in floats if f != anchor] or floats)
        t = args[k]
        args[k] = torch.cat([t, t[..., :1]], -1) if t.shape[-1] > 0 else torch.zeros(t.shape[:-1] + (2,))
        if k == anchor:
            return Malformed(("must have shape", "must share a shape", "entries", "columns", "shape")), args, backend
        return Malformed(_blame(op, k, raw)), args, backend
    if what == "meta":
        k = rng.choice([t for t in tensors if t != anchor])
        args[k] = args[k].to("meta")
        return Malformed("device" if raw else (k, "device")), args, backend
    if what == "offsets":
        k = rng.choice(offsets)
        cu = args[k].clone()
        how = rng.choice(["int64", "decreasing", "end", "start", "2d"])
        if how == "int64":
            cu = cu.long()
        elif how == "decreasing" and cu.numel() >= 3 and int(cu[-1]) > 0:
            cu[1] = int(cu[-1]) + 1
        elif how == "start":
            cu[0] = 1
        elif how == "2d":
            cu = cu[None]
        else:
            cu[-1] = int(cu[-1]) + 1
        args[k] = cu
        return Malformed(_offset_name(op, k, raw)), args, backend
    if what == "index":
        k = rng.choice(indices)
        t = args[k].clone()
        how = rng.choice(["high", "negative", "float", "count"])
        if how == "float" or t.numel() == 0:
            args[k] = t.float()
            return Malformed(k), args, backend
        if how == "count":
            args[k] = torch.cat([t, t[:1]])
            return Malformed(("positions", "entries", "type_ids", "out_rows", "ids", "dense")), args, backend
        t[rng.randrange(t.numel())] = -1 if how == "negative" else 10 ** 6
        args[k] = t
        return Malformed((k, "out of range", "outside")), args, backend
    if what == "duplicate_rows":
        rows = args["out_rows"].clone()
        rows[-1] = rows[0]
        args["out_rows"] = rows
        return Malformed("out_rows"), args, backend
    if what == "alias":
        out = args["out"]
        k = rng.choice(["dense", "position_table", "weight", "table"])
        d = out.shape[1]
        n = args["positions"].numel()
        if k == "dense":
            args["ids"], args["table"], args["dense"] = None, None, out[:n]
        elif k == "position_table":
            args["position_table"] = out[: max(1, out.shape[0])]
            args["positions"] = torch.zeros_like(args["positions"])
        elif k == "weight":
            args["weight"] = out[0]
        else:
            args["table"] = out
            args["ids"] = torch.zeros_like(args["ids"])
        return Malformed(("out", "shares memory"), ("shares memory", k)), args, backend
    if what == "out_alone":
        args["out_rows"] = None
        return Malformed("out_rows"), args, backend
    # ids_alone
    args["table"] = None
    return Malformed("ids", "table"), args, backend


def _blame(op, k, raw):
    """The name a refusal of argument ``k`` shows (the C++ ops call InterMRA's offsets cu_segments)."""
    return _offset_name(op, k, raw) if k.startswith("cu_") else k


def _offset_name(op, k, raw):
    if raw and k == "cu_segments_per_sample":
        return ("cu_segments", "cu_segments_per_sample")  # the schema's name, or the Python op's
    return (k,)


def _raw_positional(op, args):
    out = []
    for k in _SIGNATURES[op]:
        v = args.get(k)
        if k == "scale" and v is None:
            v = 1.0
        out.append(v)
    if op == "embed_layernorm" and args.get("out") is None:
        import torch

        d = args["position_table"].shape[1] if hasattr(args["position_table"], "shape") else 1
        out[10] = torch.zeros(args["positions"].numel(), d)
        out[11] = torch.arange(args["positions"].numel())
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker_main(json.loads(sys.argv[2]))
    else:
        print("usage: bench/fuzz_long.py (this module is the harness; --worker OPTIONS runs a worker)")
