"""Exact neighbour search as chunked torch GEMMs on the scan's device (`--index torch`), optionally in bf16/fp16.

||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, one (B, chunk) GEMM at a time with a running top-c, so the search runs
where the training set already lives (a GPU with --device cuda) instead of faiss on the CPU.  The c candidates
are then re-checked exactly in float32 (||q - p|| computed directly) and the best k kept, as
memaudit.neighbors.NeighborIndex does.  In float32 c = k and the search is exact; with `dtype=bf16` (or fp16)
the GEMMs run at low precision, which can reorder near ties, so c = k + CANDIDATE_MARGIN and the index counts
as approximate: its recall is measured and gated like IVF's (memaudit.metrics.index_recall), with every
GEMM in float32 as the reference (`exhaustive`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.errors import UserError
from memaudit.neighbors import padded_square_radius
from memaudit.storage import ImageStore, rows_per_chunk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CANDIDATE_MARGIN = 16  # extra low-precision candidates re-checked in float32
CHUNK = 8192  # training rows per GEMM
MEMORY_SHARE = 0.25  # of the free device memory one query batch's logits may take


class TorchIndex:
    """Exact (fp32) or low-precision-candidate (bf16/fp16) L2 search over points (M, ...) on `device`."""

    kind = "torch"

    def __init__(self, points: "Tensor | ImageStore", device: str | torch.device = "cpu", dtype: str = "fp32"):
        if len(points.shape) < 2 or points.shape[0] == 0:
            raise UserError("the neighbour index needs a non-empty set of points")
        if dtype not in DTYPES:
            raise UserError(f"--index torch: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.device = torch.device(device)
        if isinstance(points, ImageStore) and points.is_bytes:  # read from the uint8 store: no float copy
            self.store, self.flat = points.to(self.device), None
        else:
            points = points.raw if isinstance(points, ImageStore) else points
            self.store = None
            self.flat = points.detach().reshape(points.shape[0], -1).to(self.device, torch.float32).contiguous()
        self.num_points = points.shape[0]
        self.dim = int(np.prod(points.shape[1:]))
        self.chunk = rows_per_chunk(self.dim, CHUNK)
        self.sq_norms = self._squared_norms()
        self.dtype_name = dtype
        self.low = DTYPES[dtype] if dtype != "fp32" else None
        if self.low is not None and self.flat is None:
            raise UserError("--index torch:dtype=... needs the training set as float32; this one is held as uint8 "
                            "(set MEMAUDIT_FLOAT_BUDGET higher, or use --index torch)")
        self.low_points = self.flat.to(self.low) if self.low is not None else None
        self._force_fp32 = False

    def _squared_norms(self) -> Tensor:
        """||p||^2 of every point, each summed in float64 (then float32), a quarter chunk at a time (a float64
        square of a whole chunk is 4x its bytes)."""
        step = rows_per_chunk(self.dim, self.chunk, 16)
        out = []
        for a in range(0, self.num_points, step):
            rows = self._rows(a, min(a + step, self.num_points), reuse=True)
            out.append((rows.double() ** 2).sum(1).float())
        return torch.cat(out)

    def _rows(self, start: int, stop: int, reuse: bool = False) -> Tensor:
        """Rows start:stop (reuse: converted into the store's shared buffer, which the next call of any index
        overwrites)."""
        if self.flat is not None:
            return self.flat[start:stop]
        if not reuse:
            return self.store.rows(start, stop)
        return self.store.rows(start, stop, out=self.store.shared_buffer(stop - start))

    def _gather(self, idx: Tensor) -> Tensor:
        return self.flat[idx] if self.flat is not None else self.store.gather_rows(idx)

    @property
    def approximate(self) -> bool:
        return self.low is not None

    @contextmanager
    def exhaustive(self):
        """float32 GEMMs inside the block (the exact reference for the recall)."""
        self._force_fp32 = True
        try:
            yield self
        finally:
            self._force_fp32 = False

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype_name, "device": str(self.device),
                "candidates": "k + %d" % CANDIDATE_MARGIN if self.approximate else "k"}

    def query_batch(self) -> int:
        """Query rows per batch: their (rows, CHUNK) logits within MEMORY_SHARE of free device memory, and their
        float64 copy in the re-check within a chunk's bytes (memaudit.storage.rows_per_chunk)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = 1 << 30
        logits = MEMORY_SHARE * free // (4 * 3 * min(self.chunk, self.num_points))
        return int(max(1, min(rows_per_chunk(self.dim, 4096, 8), logits)))  # and the float64 re-check's copy

    def search(self, queries: Tensor, k: int, batch_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """k nearest points per query: exact distances ascending, shapes (N, k) float32 and (N, k) long, CPU."""
        if not 1 <= k <= self.num_points:
            raise UserError(f"cannot find {k} nearest neighbours among {self.num_points} points")
        if isinstance(queries, ImageStore):  # e.g. the training set against itself: chunk by chunk
            parts = [self.search(rows, k, batch_size) for _, _, rows in queries.chunks(self.chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        q = torch.as_tensor(queries).detach().reshape(queries.shape[0], -1).to(self.device, torch.float32)
        if q.shape[1] != self.dim:
            raise UserError(f"query dimension {q.shape[1]} does not match the indexed points' {self.dim}")
        low = self.low is not None and not self._force_fp32
        cand = min(self.num_points, k + CANDIDATE_MARGIN if low else k)
        dists, idxs = [], []
        for start in range(0, q.shape[0], batch_size or self.query_batch()):
            block = q[start:start + (batch_size or self.query_batch())]
            top = self._candidates(block, cand, low)
            d, i = self._recheck(block, top, k)
            dists.append(d.cpu())
            idxs.append(i.cpu())
        if not dists:
            return torch.empty((0, k)), torch.empty((0, k), dtype=torch.long)
        return torch.cat(dists), torch.cat(idxs)

    def _candidates(self, q: Tensor, c: int, low: bool) -> Tensor:
        """Indices (B, c) of the c smallest ||p||^2 - 2 q.p over chunks (a running top-c)."""
        best_val = torch.empty((q.shape[0], 0), device=self.device)
        best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=self.device)
        ql = q.to(self.low) if low else q
        for start in range(0, self.num_points, self.chunk):
            stop = min(start + self.chunk, self.num_points)
            pts = self.low_points[start:stop] if low else self._rows(start, stop, reuse=True)
            score = (ql @ pts.T).float().mul_(-2).add_(self.sq_norms[start:stop])
            vals = torch.cat([best_val, score], 1)
            cand = torch.cat([best_idx, torch.arange(start, stop, device=self.device).expand(q.shape[0], -1)], 1)
            best_val, pos = vals.topk(min(c, vals.shape[1]), dim=1, largest=False)
            best_idx = cand.gather(1, pos)
        return best_idx

    def _recheck(self, q: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact float32 distances ||q - p|| to the candidates (one column at a time), stably sorted, best k."""
        dist = torch.empty(idx.shape, device=self.device)
        for j in range(idx.shape[1]):
            dist[:, j] = (q.double() - self._gather(idx[:, j]).double()).pow(2).sum(1).sqrt().float()
        order = torch.argsort(dist, dim=1, stable=True)[:, :k]
        return dist.gather(1, order), idx.gather(1, order)

    def points(self, start: int, stop: int) -> np.ndarray:
        """Indexed points start:stop as a float32 array (a copy)."""
        return self._rows(start, stop).cpu().numpy().copy()

    def pairs_within(self, queries: np.ndarray, radius: float) -> list[tuple[int, int]]:
        """(query row, point index) pairs with ||q - p|| <= radius, by float32 GEMM with a padded radius, each
        candidate then checked with its exact distance."""
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        q_sq = (q.double() ** 2).sum(1)
        padded = padded_square_radius(radius, max(float(q_sq.max()) if len(q_sq) else 0.0,
                                                  float(self.sq_norms.max())))
        out: list[tuple[int, int]] = []
        for start in range(0, self.num_points, self.chunk):
            stop = min(start + self.chunk, self.num_points)
            d2 = (q_sq[:, None].float() - 2 * q @ self._rows(start, stop, reuse=True).T + self.sq_norms[start:stop])
            rows, cols = torch.nonzero(d2 <= padded, as_tuple=True)
            if len(rows):
                exact = (q[rows].double() - self._gather(start + cols).double()).pow(2).sum(1).sqrt()
                keep = exact <= radius
                out += list(zip(rows[keep].tolist(), (cols[keep] + start).tolist()))
        return sorted(out)
