"""Activation offload: the checkpointed blocks' inputs wait for backward in (pinned) host memory.

With activation checkpointing each block keeps only its input for backward, and at long
context those inputs dominate GPU memory (30 blocks x N x dim bf16: 60 GiB at N = 1M, dim
1024). `BlockInputOffload.checkpoint` is a drop-in checkpoint function for
torch's checkpoint_wrapper: it runs torch.utils.checkpoint (non-reentrant) under a
torch.autograd.graph.saved_tensors_hooks pair. Non-reentrant checkpointing saves the block's
tensor arguments as saved tensors through the ambient hooks before it enters its own, so the
pack hook sees exactly those arguments; it copies the block's input (its first positional
argument, the residual stream) to host memory and keeps the others (RoPE tables shared by
every block) as they are. The unpack hook, called when backward recomputes the block, hands
the input back on the device.

On CUDA the copies run on a stream of their own, ordered against the compute stream by
events, so they overlap the neighbouring blocks' compute:
- forward: the copy of block i's input to pinned memory starts once the work that produced
  it is done and runs while block i computes; the caching allocator is told the copy stream
  reads the input (record_stream), so its memory is reused only after the copy;
- backward: when block i's input is unpacked (block i's recomputation begins), the copy of
  block i-1's input back to the GPU is queued, so it runs while block i recomputes and
  back-propagates; block i-1's unpack then only makes the compute stream wait on its event.
  The last block's input, the first one backward needs, is fetched on demand.
At most two block inputs are on the GPU at a time in backward: the one being recomputed and
the one arriving.

torch.autograd.graph.save_on_cpu does the same moves with less: its copies run on the compute
stream, so each one adds its time to the step, and it fetches an input only when backward
needs it; it would also copy the RoPE tables once per block, and its whole-tensor pinned
buffers are rounded up to a power of two (a 1.5 GiB input pins 2 GiB).

Pinned memory comes from torch's caching host allocator, which rounds a request up to a power
of two; a copy is therefore made of pieces whose sizes are the powers of two of its byte
count (its binary digits, down to PIECE_FLOOR_BYTES), so no piece is rounded by more than
that floor. `pinned_bytes` says how much one input pins; lh_cp.train.plan counts it.

On CPU the same hooks run without streams: the input is copied to a separate host tensor and
back, synchronously. That saves no memory (the input was in host memory already) and changes
no number; it keeps one code path, so the CPU tests exercise the bookkeeping the GPU uses.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# Pieces below this size are not split further: the allocator's rounding of the last piece
# wastes less than this per offloaded input.
PIECE_FLOOR_BYTES = 2 * 2**20


def _power_of_two_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def piece_sizes(nbytes: int) -> list[int]:
    """Byte sizes of the pieces one input of `nbytes` is copied into: nbytes's binary digits
    of at least PIECE_FLOOR_BYTES, largest first, then the rest (< PIECE_FLOOR_BYTES) in one
    piece. They sum to nbytes."""
    pieces = [
        1 << bit
        for bit in range(nbytes.bit_length() - 1, -1, -1)
        if nbytes >> bit & 1 and 1 << bit >= PIECE_FLOOR_BYTES
    ]
    rest = nbytes - sum(pieces)
    return pieces + ([rest] if rest else [])


def pinned_bytes(nbytes: int) -> int:
    """Host memory one offloaded input of `nbytes` pins: its pieces as the caching host
    allocator rounds them (each up to a power of two)."""
    return sum(_power_of_two_ceil(size) for size in piece_sizes(nbytes))


@dataclass
class OffloadStats:
    """What the offload did, for tests and metrics. Counts are since construction.

    packed: block inputs copied to host memory.
    fetched_ahead: inputs whose copy back was queued while the block after them in the
        forward order was being recomputed (the overlapped path).
    fetched_on_demand: inputs fetched only when their own block needed them (the first one
        of each backward, or any whose prefetch was not issued).
    host_bytes: host memory held now by offloaded inputs (pieces as pinned, see pinned_bytes).
    peak_host_bytes: the most host_bytes has been.
    """

    packed: int = 0
    fetched_ahead: int = 0
    fetched_on_demand: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0


class _HostCopy:
    """One block input in host memory: its pieces, the metadata to rebuild it, and the device
    tensor being fetched back (with the event that marks its arrival)."""

    def __init__(self, source: torch.Tensor, pieces: list[torch.Tensor]) -> None:
        self.shape, self.dtype, self.device = source.shape, source.dtype, source.device
        self.pieces = pieces
        self.previous: weakref.ref[_HostCopy] | None = None  # packed just before this one
        self.fetched: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view [nbytes]."""
    return tensor.reshape(-1).view(torch.uint8)


class BlockInputOffload:
    """Keeps the inputs of checkpointed blocks in host memory between forward and backward.

    Use `checkpoint` as checkpoint_wrapper's checkpoint_fn (lh_cp.parallel.fsdp does). One
    object serves every block of a model: the inputs are chained in the order they were
    packed, which is the order backward needs them in reverse, and that is what the prefetch
    follows. Unpacking the same input twice (a second backward over a retained graph) fetches
    it again; the host copy lives as long as the autograd graph that saved it.
    """

    def __init__(self) -> None:
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref[_HostCopy] | None = None
        # Unpacks and frees run on autograd threads too; reentrant because a free (a weakref
        # finalizer) can run inside a locked section of the same thread.
        self._lock = threading.RLock()

    def checkpoint(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) under non-reentrant activation checkpointing, with args[0] (the
        block's input) offloaded while it waits for backward."""
        # The pack hook lives as long as each tensor it saved (autograd keeps it with the saved
        # variable), so it must not hold the input itself, or the input would never be freed:
        # it keeps only the input's identity.
        block_input = _identity(args[0])

        def pack(tensor: torch.Tensor):
            if _identity(tensor) != block_input:
                return tensor
            return self._pack(tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> _HostCopy:
        source = tensor if tensor.is_contiguous() else tensor.contiguous()
        flat = _bytes_of(source)
        on_cuda = source.device.type == "cuda"
        pieces = [
            torch.empty(size, dtype=torch.uint8, pin_memory=on_cuda)
            for size in piece_sizes(flat.numel())
        ]
        if on_cuda:
            stream = self._stream(source.device)
            # The input is written by compute work queued so far: copy after it.
            stream.wait_stream(torch.cuda.current_stream(source.device))
            with torch.cuda.stream(stream):
                _copy_pieces(flat, pieces, to_pieces=True)
            # The input's memory goes back to the allocator when the block no longer needs it;
            # record_stream keeps it from another tensor until this copy has read it.
            source.record_stream(stream)
        else:
            _copy_pieces(flat, pieces, to_pieces=True)
        copy = _HostCopy(source, pieces)
        held = pinned_bytes(flat.numel()) if on_cuda else flat.numel()
        weakref.finalize(copy, self._release, held)
        with self._lock:
            copy.previous, self._last = self._last, weakref.ref(copy)
            self.stats.packed += 1
            self.stats.host_bytes += held
            self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.stats.host_bytes)
        return copy

    def _release(self, held: int) -> None:
        with self._lock:
            self.stats.host_bytes -= held

    def _fetch(self, copy: _HostCopy) -> None:
        """Queue the copy of `copy` back to its device (on CPU: make it now)."""
        destination = torch.empty(copy.shape, dtype=copy.dtype, device=copy.device)
        if copy.device.type == "cuda":
            stream = self._stream(copy.device)
            # The destination was allocated on the compute stream, whose queued kernels may
            # still use that memory under an earlier tensor: write it only after them.
            stream.wait_stream(torch.cuda.current_stream(copy.device))
            with torch.cuda.stream(stream):
                _copy_pieces(_bytes_of(destination), copy.pieces, to_pieces=False)
                copy.arrived = stream.record_event()
        else:
            _copy_pieces(_bytes_of(destination), copy.pieces, to_pieces=False)
        copy.fetched = destination

    def _unpack(self, packed):
        if not isinstance(packed, _HostCopy):
            return packed
        with self._lock:
            if packed.fetched is None:
                self.stats.fetched_on_demand += 1
                self._fetch(packed)
            tensor, arrived = packed.fetched, packed.arrived
            packed.fetched, packed.arrived = None, None
            previous = packed.previous() if packed.previous is not None else None
            if previous is not None and previous.fetched is None:
                self.stats.fetched_ahead += 1
                self._fetch(previous)
        if arrived is not None:
            torch.cuda.current_stream(tensor.device).wait_event(arrived)
        return tensor


def _copy_pieces(flat: torch.Tensor, pieces: list[torch.Tensor], to_pieces: bool) -> None:
    """Copy the flat uint8 tensor into consecutive pieces (to_pieces) or back from them;
    asynchronous between pinned host and CUDA memory, synchronous on CPU."""
    begin, non_blocking = 0, flat.device.type == "cuda"
    for piece in pieces:
        window = flat[begin : begin + piece.numel()]
        if to_pieces:
            piece.copy_(window, non_blocking=non_blocking)
        else:
            window.copy_(piece, non_blocking=non_blocking)
        begin += piece.numel()


def _identity(tensor: torch.Tensor) -> tuple:
    """What tells a saved tensor to be the block's input (the same memory, shape and type):
    FSDP2 hands the block an alias of the tensor the model passed, and autograd may wrap it
    anew, so object identity would not do."""
    return (tensor.device, tensor.dtype, tensor.shape, tensor.stride(), tensor.data_ptr())
