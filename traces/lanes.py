"""One rank's Kineto events → normalized ops: lanes, kinds, labels, steps, dependencies.

Lanes (ops on a lane never overlap and run in start order):
    cpu:main            the thread holding the ProfilerStep#N annotations (the one that steps
                        the profiler), else the one with the most cpu_op events
    cpu:gloo            the first worker thread that runs `gloo:*` collectives
    cpu:gloo/1, /2 ...  further such threads, numbered by their first event
                        (`cpu:nccl`, `cpu:mpi` ... likewise for those backends)
    cpu:thread/1 ...    any other CPU thread (e.g. the autograd backward thread), by first event
    cuda:D/stream:S     GPU device D (args.device, else pid), stream S (args.stream, else tid)

A CPU lane holds the *top-level* events of its thread (cpu_op, cuda_runtime, cuda_driver and
comm annotations; nested ops are never counted twice), cut into pieces at the nested CUDA
runtime calls so that each launch / synchronize call is its own op: a top-level `aten::mm`
that calls cudaLaunchKernel becomes `aten::mm` | `cudaLaunchKernel` | `aten::mm`. On a
CPU-only rank nested c10d issue calls and `...wait` ops are cut out the same way (an
autograd Function `_ExchangeStart` that calls `c10d::alltoall_base_` becomes
`_ExchangeStart` | `c10d::alltoall_base_` | `_ExchangeStart`, kinds host | host | host).
The pieces cover exactly the top-level time. user_annotation ranges are not ops: `L{n}/{block}`
ranges give labels, `ProfilerStep#N` gives the step, others are kept as labels when no
`L...` range encloses the op (collective ranges, `nccl:*` / `gloo:*`, never are).

Labels: an op gets the innermost `L...` user_annotation range of its thread that contains
its midpoint (else the innermost other annotation, else ""). Backward work, outside every
`L...` range (on CUDA autograd runs the backward pass on a worker thread of its own; on CPU
on the calling thread, inside moesim's plain `backward` range), takes per top-level op the
label of the forward op that its first `fwdbwd` flow starts from, plus ":bwd"
(`L0/experts:bwd`, `head:bwd`); ops no flow reaches keep their annotation. GPU ops take the label and step of the CPU call that
launched them (matched by `correlation`); gloo collectives those of the c10d call that
issued them.

Dependencies (`deps`, besides the lane predecessor):
    kernel / memcpy / memset   ← the cuda_runtime / cuda_driver call with its correlation
    first GPU op on stream S after cudaStreamWaitEvent ← last op on the recorded stream
                               before the matching cudaEventRecord (cuda_sync args)
    CPU cuda*Synchronize       ← the GPU ops it waits for (cuda_sync args; device-wide
                               when a cudaDeviceSynchronize has none)
    gloo collective            ← the c10d / record_param_comms call that issued it
    CPU wait op                ← the oldest collective issued before it and not yet waited
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict

import numpy as np

from traces.classify import (
    CPU_COMM_ANNOTATION_RE,
    ISSUE_OP_RE,
    SYNC_RUNTIME_RE,
    WAIT_OP_RE,
    ClassifyConfig,
    collective_details,
    cpu_collective_details,
    collective_of,
)
from traces.kineto import CPU_OP, CUDA_SYNC, DRIVER, KERNEL, MEMCPY, MEMSET, RUNTIME, USER_ANN, TraceFile

L_LABEL_PREFIX = "L"


class _Painter:
    """Innermost-range lookup for properly nested ranges [start, end) → value."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, values: list[str]) -> None:
        self.values = values
        self.points = np.unique(np.concatenate([starts, ends])) if len(values) else np.zeros(0)
        self.segment = np.full(max(self.points.size - 1, 0), -1, dtype=np.int64)
        order = np.lexsort((-(ends - starts), starts)) if len(values) else []
        for k in order:  # outer ranges first: an inner range paints over its parent
            i0, i1 = np.searchsorted(self.points, [starts[k], ends[k]])
            self.segment[i0:i1] = k

    def lookup(self, t: np.ndarray) -> np.ndarray:
        """Index into `values` of the innermost range holding each time, -1 if none."""
        if self.segment.size == 0:
            return np.full(np.shape(t), -1, dtype=np.int64)
        j = np.searchsorted(self.points, t, side="right") - 1
        valid = (j >= 0) & (j < self.segment.size)
        return np.where(valid, self.segment[np.clip(j, 0, self.segment.size - 1)], -1)


def _top_level(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) bool: events not nested in an earlier one; input sorted by (start, -dur)."""
    top = np.ones(start.size, dtype=bool)
    if start.size > 1:
        reach = np.maximum.accumulate(end)
        top[1:] = start[1:] >= reach[:-1]
    return top


def _is_l_label(name: str) -> bool:
    return len(name) > 1 and name[0] == L_LABEL_PREFIX and name[1].isdigit() and "/" in name


def _int_arg(args: dict | None, key: str, default: int) -> int:
    if args is None:
        return default
    value = args.get(key)
    return value if value.__class__ is int else default


def rank_ops(tf: TraceFile, config: ClassifyConfig) -> dict[str, object]:
    """Columns of the normalized table for one rank (ids local: 0..n-1, deps local).

    Returns a dict with lane, kind, name, label, start_us (file clock), dur_us, bytes,
    coll, group, coll_bytes, splits, seq, step, deps.
    """
    cat, names, args = tf.cat, tf.name, tf.args
    start = tf.ts_us
    end = start + tf.dur_us
    is_gpu = (cat == KERNEL) | (cat == MEMCPY) | (cat == MEMSET)
    has_gpu = bool(is_gpu.any())
    cpu_like = (cat == CPU_OP) | (cat == RUNTIME) | (cat == DRIVER) | (cat == USER_ANN)

    # ---- annotations: steps, labels, comm ranges
    ann = np.flatnonzero(cat == USER_ANN)
    step_ann = [i for i in ann if names[i].startswith("ProfilerStep#") and names[i][13:].isdigit()]
    comm_ann = {int(i) for i in ann if CPU_COMM_ANNOTATION_RE.match(names[i])}
    label_ann = [i for i in ann if i not in comm_ann and not names[i].startswith("ProfilerStep#")]
    steps = _Painter(start[step_ann], end[step_ann], [names[i][13:] for i in step_ann])

    # ---- threads and their roles
    cpu_idx = np.flatnonzero(cpu_like)
    n_threads = len(tf.threads)
    op_count = np.bincount(tf.thread[cat == CPU_OP], minlength=n_threads)
    any_count = np.bincount(tf.thread[cpu_idx], minlength=n_threads)
    # the thread that steps the profiler (on CUDA, autograd's backward thread can run more ops)
    step_threads = Counter(int(tf.thread[i]) for i in step_ann)
    if step_threads:
        main = step_threads.most_common(1)[0][0]
    else:
        main = int(np.argmax(op_count)) if op_count.sum() else (int(np.argmax(any_count)) if any_count.sum() else -1)
    if has_gpu:  # nccl:* ranges wrap kernel launches; only gloo worker threads run comm on CPU
        comm_ann = {i for i in comm_ann if tf.thread[i] != main and names[i].startswith("gloo:")}
    by_time = cpu_idx[np.argsort(start[cpu_idx], kind="stable")]
    first_threads, first_pos = np.unique(tf.thread[by_time], return_index=True)
    first_start = dict(zip(first_threads.tolist(), start[by_time[first_pos]].tolist()))
    comm_threads = {int(tf.thread[i]): names[i].split(":", 1)[0] for i in sorted(comm_ann, key=lambda i: start[i])}
    lane_of_thread: dict[int, str] = {}
    backend_count: dict[str, int] = defaultdict(int)
    other = 0
    for thread in sorted(first_start, key=first_start.get):
        if thread == main:
            lane_of_thread[thread] = "cpu:main"
        elif thread in comm_threads:
            backend = comm_threads[thread]
            k = backend_count[backend]
            backend_count[backend] += 1
            lane_of_thread[thread] = f"cpu:{backend}" + (f"/{k}" if k else "")
        else:
            other += 1
            lane_of_thread[thread] = f"cpu:thread/{other}"

    # label painters per thread: L{layer}/{block} ranges first, then the other annotations
    painters = {}
    for thread in lane_of_thread:
        t_ann = [i for i in label_ann if tf.thread[i] == thread]
        l_ann = [i for i in t_ann if _is_l_label(names[i])]
        f_ann = [i for i in t_ann if not _is_l_label(names[i])]
        painters[thread] = (_Painter(start[l_ann], end[l_ann], [names[i] for i in l_ann]),
                            _Painter(start[f_ann], end[f_ann], [names[i] for i in f_ann]))
    backward_label = _backward_labels(tf, painters)

    out = _OpColumns()
    kind_cache: dict[tuple, str] = {}
    comm_call_cache: dict[str, bool] = {}
    event_piece: dict[int, int] = {}  # CPU event index → the op (piece) ending with it

    # ---- CPU lanes: top-level events cut at nested runtime calls
    for thread, lane in lane_of_thread.items():
        members = cpu_idx[(tf.thread[cpu_idx] == thread) & (cat[cpu_idx] != USER_ANN)]
        own_comm = [i for i in comm_ann if tf.thread[i] == thread]
        if own_comm:
            members = np.concatenate([members, np.array(own_comm, dtype=np.int64)])
        if members.size == 0:
            continue
        members = members[np.lexsort((-(end[members] - start[members]), start[members]))]
        top = _top_level(start[members], end[members])
        tops = members[top]
        nested = members[~top]
        is_cut = (cat[nested] == RUNTIME) | (cat[nested] == DRIVER)
        comm_calls = np.zeros(nested.size, dtype=bool)
        if not has_gpu:  # CPU collectives: issue and wait calls are their own pieces
            comm_calls = np.array([cat[i] == CPU_OP and _is_comm_call(names[i], comm_call_cache) for i in nested.tolist()], dtype=bool)
            is_cut |= comm_calls
        cut_candidates = nested[is_cut]
        cuts = cut_candidates[_top_level(start[cut_candidates], end[cut_candidates])]
        pieces = _cut(tops, cuts, start, end)
        # a top-level op that issues or waits for a collective is comm framework, not compute
        issuing_tops = set()
        if comm_calls.any():
            calls = nested[comm_calls]
            holder = np.searchsorted(start[tops], start[calls], side="right") - 1
            issuing_tops = set(tops[holder[holder >= 0]].tolist())
        l_paint, f_paint = painters[thread]
        ps, pe, src = pieces
        mid = (ps + pe) / 2
        l_hit, f_hit, s_hit = l_paint.lookup(mid), f_paint.lookup(mid), steps.lookup(mid)
        first_id = out.n
        src_list = src.tolist()
        piece_names = [names[i] for i in src_list]
        kinds = [_cpu_kind(int(cat[i]), names[i], has_gpu, kind_cache) for i in src_list]
        if issuing_tops:
            kinds = ["host" if i in issuing_tops and k == "compute" else k for i, k in zip(src_list, kinds)]
        l_values = np.array(l_paint.values + [""], dtype=object)
        f_values = np.array(f_paint.values + [""], dtype=object)
        labels = np.where(l_hit >= 0, l_values[l_hit], f_values[f_hit]).tolist()
        if thread in backward_label:  # backward work outside any L-range: its forward op's label
            flow_ts, flow_label = backward_label[thread]
            holder = np.searchsorted(start[tops], mid, side="right") - 1
            first_flow = np.searchsorted(flow_ts, start[tops], side="left")
            top_label = [flow_label[k] if k < len(flow_ts) and flow_ts[k] <= end[t] else ""
                         for k, t in zip(first_flow.tolist(), tops.tolist())]
            labels = [(top_label[h] or lab) if h >= 0 and lh < 0 else lab
                      for lab, h, lh in zip(labels, holder.tolist(), l_hit.tolist())]
        step_values = np.array([int(v) for v in steps.values] + [-1], dtype=np.int64)
        out.extend(lane, kinds, piece_names, labels, ps, pe - ps, step_values[s_hit])
        # every CPU event of the thread → the piece that ends with it
        event_piece.update(_event_pieces(members, ps, pe, start, end, first_id))

    # ---- GPU lanes
    corr_piece: dict[int, int] = {}
    corr_start: dict[int, float] = {}
    runtime_idx = np.flatnonzero((cat == RUNTIME) | (cat == DRIVER)).tolist()
    runtime_corr = tf.corr[runtime_idx].tolist()
    runtime_start = start[runtime_idx].tolist()
    for i, corr, t in zip(runtime_idx, runtime_corr, runtime_start):
        if corr >= 0:
            corr_start[corr] = t
            piece = event_piece.get(i)
            if piece is not None:
                corr_piece[corr] = piece
    gpu_idx = np.flatnonzero(is_gpu)
    gpu_idx = gpu_idx[np.argsort(start[gpu_idx], kind="stable")]
    gpu_lane = list(zip(tf.device[gpu_idx].tolist(), tf.stream[gpu_idx].tolist()))
    # regexes run once per distinct kernel name (a trace repeats a few hundred names)
    comm_name = {n: bool(config.comm_kernel_re.search(n)) for n in {names[i] for i in gpu_idx}}
    stream_comm_name = {n: bool(config.comm_stream_kernel_re.search(n)) for n in comm_name}
    comm_lanes = {lane for lane, i in zip(gpu_lane, gpu_idx) if cat[i] == KERNEL and comm_name[names[i]]}
    comm_lanes |= {lane for lane in gpu_lane if lane[1] in set(config.comm_streams)}
    launch_time: dict[tuple, list[float]] = defaultdict(list)  # lane → launch times, lane order
    lane_ops: dict[tuple, list[int]] = defaultdict(list)
    for (device, stream), i in zip(gpu_lane, gpu_idx):
        name = names[i]
        a = args[i]
        if cat[i] != KERNEL or name.startswith(("Memcpy", "Memset")):
            kind = "memory"
        elif comm_name[name] or ((device, stream) in comm_lanes and stream_comm_name[name]):
            kind = "comm"
        else:
            kind = "compute"
        corr = int(tf.corr[i])
        launcher = corr_piece.get(corr, -1)
        if launcher >= 0:
            label, step = out.label[launcher], out.step[launcher]
        else:
            s_hit = steps.lookup(np.array([(start[i] + end[i]) / 2]))[0]
            label, step = "", (int(steps.values[s_hit]) if s_hit >= 0 else -1)
        op = out.add(f"cuda:{device}/stream:{stream}", kind, name, label, float(start[i]), float(end[i] - start[i]), step)
        if launcher >= 0:
            out.deps[op].append(launcher)
        if kind == "memory":
            out.bytes[op] = float(tf.nbytes[i])
        elif kind == "comm":
            out.set_collective(op, collective_of(name, a), *collective_details(a, tf.pg_ranks))
        launch_time[(device, stream)].append(corr_start.get(corr, float(start[i])))
        lane_ops[(device, stream)].append(op)

    _sync_deps(tf, out, corr_start, event_piece, launch_time, lane_ops)
    _gloo_deps(tf, out, event_piece, has_gpu)
    out.assign_seq()
    return out.columns()


def _backward_labels(tf: TraceFile, painters: dict) -> dict[int, tuple[np.ndarray, list[str]]]:
    """Labels for backward work, which runs outside the forward's L-ranges (CUDA autograd on
    a worker thread of its own; on CPU the calling thread, inside a plain `backward` range):
    thread → (times of the `fwdbwd` flow ends there, sorted; for each, the label of the
    forward op at the flow's start, with ":bwd"). An autograd node a flow ends in takes that
    label over any non-L annotation around it."""
    starts = {int(i): (float(t), int(th)) for i, t, th, s in
              zip(tf.flow_id.tolist(), tf.flow_ts_us.tolist(), tf.flow_thread.tolist(), tf.flow_is_start.tolist()) if s}
    ends: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for i, t, th, s in zip(tf.flow_id.tolist(), tf.flow_ts_us.tolist(), tf.flow_thread.tolist(), tf.flow_is_start.tolist()):
        if s or i < 0 or i not in starts or starts[i][1] not in painters:
            continue
        fwd_ts, fwd_thread = starts[i]
        l_paint, f_paint = painters[fwd_thread]
        at = np.array([fwd_ts])
        l_hit, f_hit = int(l_paint.lookup(at)[0]), int(f_paint.lookup(at)[0])
        label = l_paint.values[l_hit] if l_hit >= 0 else (f_paint.values[f_hit] if f_hit >= 0 else "")
        ends[th].append((t, f"{label}:bwd" if label else ""))
    out = {}
    for th, items in ends.items():
        items.sort()
        out[th] = (np.array([t for t, _ in items]), [lab for _, lab in items])
    return out


def _is_comm_call(name: str, cache: dict[str, bool]) -> bool:
    """A collective issue (c10d::*) or wait op, memoised per name. record_param_comms is
    left inside the c10d call that wraps it."""
    hit = cache.get(name)
    if hit is None:
        hit = cache[name] = name != "record_param_comms" and bool(ISSUE_OP_RE.match(name) or WAIT_OP_RE.search(name))
    return hit


def _cpu_kind(cat: int, name: str, has_gpu: bool, cache: dict[tuple, str]) -> str:
    """Kind of a CPU piece (see traces/classify.py), memoised per (category, name)."""
    key = (cat, name)
    kind = cache.get(key)
    if kind is None:
        if cat == USER_ANN:
            kind = "comm"
        elif cat in (RUNTIME, DRIVER):
            kind = "sync" if SYNC_RUNTIME_RE.match(name) else "host"
        elif WAIT_OP_RE.search(name):
            kind = "sync"
        elif has_gpu or ISSUE_OP_RE.match(name):
            kind = "host"
        else:
            kind = "compute"
        cache[key] = kind
    return kind


def _cut(tops: np.ndarray, cuts: np.ndarray, start: np.ndarray, end: np.ndarray):
    """Pieces (start, end, source event) covering the top-level events, split at cuts."""
    t_s, t_e = start[tops], end[tops]
    c_s, c_e = start[cuts], end[cuts]
    points = np.unique(np.concatenate([t_s, t_e, c_s, c_e]))
    ps, pe = points[:-1], points[1:]
    mid = (ps + pe) / 2
    ti = np.searchsorted(t_s, mid, side="right") - 1
    inside = (ti >= 0) & (mid < t_e[np.clip(ti, 0, None)])
    ci = np.searchsorted(c_s, mid, side="right") - 1 if cuts.size else np.full(mid.size, -1)
    in_cut = (ci >= 0) & (mid < (c_e[np.clip(ci, 0, None)] if cuts.size else mid))
    src = np.where(in_cut, cuts[np.clip(ci, 0, None)] if cuts.size else -1, tops[np.clip(ti, 0, None)])
    ps, pe, src = ps[inside], pe[inside], src[inside]
    zero = tops[t_e == t_s]  # zero-length top-level events keep a (zero-length) op
    if zero.size:
        ps = np.concatenate([ps, start[zero]])
        pe = np.concatenate([pe, end[zero]])
        src = np.concatenate([src, zero])
        order = np.lexsort((pe, ps))
        ps, pe, src = ps[order], pe[order], src[order]
    return ps, pe, src


def _event_pieces(members: np.ndarray, ps: np.ndarray, pe: np.ndarray, start: np.ndarray, end: np.ndarray,
                  first_id: int) -> dict[int, int]:
    """event → op id: the last piece ending by the event's end and starting inside it
    (for a zero-length event: the piece holding its start)."""
    if ps.size == 0:
        return {}
    e_s, e_e = start[members], end[members]
    j = np.searchsorted(pe, e_e, side="right") - 1
    ok = (j >= 0) & (ps[np.clip(j, 0, None)] >= e_s - 1e-9)
    j_alt = np.clip(np.searchsorted(ps, e_s, side="right") - 1, 0, ps.size - 1)
    j = np.where(ok, j, j_alt) + first_id
    return dict(zip(members.tolist(), j.tolist()))


def _last_before(times: list[float], t: float) -> int:
    """Index of the last launch strictly before t, -1 if none."""
    return int(np.searchsorted(np.asarray(times), t, side="left")) - 1


def _sync_deps(tf, out, corr_start, event_piece, launch_time, lane_ops) -> None:
    """Cross-stream and CPU-sync deps from cuda_sync args (or device syncs without them)."""
    cat, args = tf.cat, tf.args
    runtime_idx = np.flatnonzero(cat == RUNTIME).tolist()
    corr_runtime_piece = {}
    for i in runtime_idx:
        piece = event_piece.get(i)
        if piece is not None:
            corr = int(tf.corr[i])
            if corr >= 0:
                corr_runtime_piece[corr] = piece
    by_stream: dict[int, list[tuple]] = defaultdict(list)
    for lane in lane_ops:
        by_stream[lane[1]].append(lane)

    def last_op(stream: int, t: float) -> list[int]:
        found = []
        for lane in by_stream.get(stream, []):
            k = _last_before(launch_time[lane], t)
            if k >= 0:
                found.append(lane_ops[lane][k])
        return found

    seen_sync = set()
    for i in np.flatnonzero(cat == CUDA_SYNC):
        a = args[i] or {}
        corr = _int_arg(a, "correlation", -1)
        kind = a.get("cuda_sync_kind")
        t_call = corr_start.get(corr)
        if t_call is None:
            continue
        seen_sync.add(corr)
        record = _int_arg(a, "wait_on_cuda_event_record_corr_id", -1)
        t_record = corr_start.get(record, t_call)
        waited_on = _int_arg(a, "wait_on_stream", -1)
        if kind == "Stream Wait Event":
            stream = _int_arg(a, "stream", -1)
            sources = last_op(waited_on, t_record)
            for lane in by_stream.get(stream, []):
                k = _last_before(launch_time[lane], t_call) + 1
                if k < len(lane_ops[lane]) and sources:
                    out.deps[lane_ops[lane][k]].extend(s for s in sources if s != lane_ops[lane][k])
            continue
        piece = corr_runtime_piece.get(corr)
        if piece is None or not SYNC_RUNTIME_RE.match(out.name[piece]):
            continue  # e.g. cudaEventQuery is traced as "Event Sync" but never blocks
        if kind == "Event Sync" and waited_on >= 0:
            out.deps[piece].extend(last_op(waited_on, t_record))
        elif kind == "Stream Sync":
            out.deps[piece].extend(last_op(_int_arg(a, "stream", -1), t_call))
        elif kind == "Context Sync":
            for stream in by_stream:
                out.deps[piece].extend(last_op(stream, t_call))
    # traces without cuda_sync events (torch.profiler's default): cudaDeviceSynchronize waits
    # for every stream; cudaStreamSynchronize for the stream of the last GPU op its thread
    # launched before it (PyTorch syncs the current stream after its copy to the host)
    launched: dict[str, list[tuple[float, int]]] = defaultdict(list)  # CPU lane → (launch time, stream)
    for lane, ops_ in lane_ops.items():
        for op in ops_:
            launcher = next((d for d in out.deps[op] if out.lane[d].startswith("cpu:")), None)
            if launcher is not None:
                launched[out.lane[launcher]].append((out.start[launcher], lane[1]))
    for items in launched.values():
        items.sort()
    for i in runtime_idx:
        if i not in event_piece or int(tf.corr[i]) in seen_sync:
            continue
        piece, t = event_piece[i], float(tf.ts_us[i])
        if tf.name[i] == "cudaDeviceSynchronize":
            for stream in by_stream:
                out.deps[piece].extend(last_op(stream, t))
        elif tf.name[i] == "cudaStreamSynchronize":
            before = launched.get(out.lane[piece], [])
            k = bisect.bisect_left(before, (t, -1)) - 1
            if k >= 0:
                out.deps[piece].extend(last_op(before[k][1], t))


def _gloo_deps(tf: TraceFile, out, event_piece: dict[int, int], has_gpu: bool) -> None:
    """CPU collectives: issue call → worker-thread collective → wait op."""
    cat, names, start = tf.cat, tf.name, tf.ts_us
    comm_ops = [k for k in range(out.n) if out.kind[k] == "comm" and out.lane[k].startswith("cpu:")]
    if not comm_ops:
        return
    cpu_ops = np.flatnonzero(cat == CPU_OP)
    issues = [int(i) for i in cpu_ops if names[i] == "record_param_comms"]
    if not issues:
        issues = [int(i) for i in cpu_ops if ISSUE_OP_RE.match(names[i])]
    issues.sort(key=lambda i: start[i])
    comm_ops.sort(key=lambda k: out.start[k])
    # the gloo:* annotation each comm op comes from (its args hold the input tensors' shapes)
    comm_set = set(comm_ops)
    ann_of = {piece: ev for ev, piece in event_piece.items() if piece in comm_set and cat[ev] == USER_ANN}
    p = 0
    issued_at: dict[int, float] = {}
    for k in comm_ops:
        comm_args = tf.args[ann_of[k]] if k in ann_of else None
        if p < len(issues) and start[issues[p]] <= out.start[k]:
            i = issues[p]
            p += 1
            piece = event_piece.get(i)
            if piece is not None:
                out.deps[k].append(piece)
                out.label[k], out.step[k] = out.label[piece], out.step[piece]
            issued_at[k] = float(start[i])
            a = tf.args[i]
            coll = collective_of(out.name[k], a)
            out.set_collective(k, coll, *cpu_collective_details(names[i], a, comm_args, tf.pg_ranks))
        else:
            issued_at[k] = out.start[k]
            out.set_collective(k, collective_of(out.name[k], None),
                               *cpu_collective_details("", None, comm_args, tf.pg_ranks))
    if has_gpu:
        return
    waits = sorted((k for k in range(out.n) if out.kind[k] == "sync" and WAIT_OP_RE.search(out.name[k])), key=lambda k: out.start[k])
    pending = sorted(issued_at, key=issued_at.get)
    for w in waits:
        for k in pending:
            if issued_at[k] < out.start[w]:
                out.deps[w].append(k)
                pending.remove(k)
                break


class _OpColumns:
    """Row-wise accumulation of one rank's ops (lists, turned into columns at the end)."""

    def __init__(self) -> None:
        self.n = 0
        self.lane: list[str] = []
        self.kind: list[str] = []
        self.name: list[str] = []
        self.label: list[str] = []
        self.start: list[float] = []
        self.dur: list[float] = []
        self.step: list[int] = []
        self.deps: list[list[int]] = []
        self.bytes: dict[int, float] = {}
        self.coll: dict[int, tuple] = {}

    def add(self, lane: str, kind: str, name: str, label: str, start_us: float, dur_us: float, step: int) -> int:
        self.lane.append(lane)
        self.kind.append(kind)
        self.name.append(name)
        self.label.append(label)
        self.start.append(start_us)
        self.dur.append(dur_us)
        self.step.append(step)
        self.deps.append([])
        self.n += 1
        return self.n - 1

    def extend(self, lane: str, kinds: list[str], names: list[str], labels: list[str],
               start_us: np.ndarray, dur_us: np.ndarray, steps: np.ndarray) -> None:
        n = len(kinds)
        self.lane.extend([lane] * n)
        self.kind.extend(kinds)
        self.name.extend(names)
        self.label.extend(labels)
        self.start.extend(start_us.tolist())
        self.dur.extend(dur_us.tolist())
        self.step.extend(steps.tolist())
        self.deps.extend([] for _ in range(n))
        self.n += n

    def set_collective(self, op: int, coll: str, group: str, coll_bytes: float, splits: list[float], seq: int) -> None:
        self.coll[op] = (coll, group, coll_bytes, splits, seq)

    def assign_seq(self) -> None:
        """Ops without a `Seq` arg get their order among the rank's comm ops of their group."""
        count: dict[str, int] = defaultdict(int)
        for op in sorted(self.coll, key=lambda k: self.start[k]):
            coll, group, coll_bytes, splits, seq = self.coll[op]
            if seq < 0:
                seq = count[group]
            count[group] = seq + 1
            self.coll[op] = (coll, group, coll_bytes, splits, seq)

    def columns(self) -> dict[str, object]:
        """Column arrays; deps as an arrow list array (local ids) built from offsets."""
        n = self.n
        coll_str = [""] * n
        group = [""] * n
        coll_bytes = np.zeros(n)
        seq = np.full(n, -1, dtype=np.int64)
        splits: list[list[float]] = [[] for _ in range(n)]
        for op, (c, g, b, sp, q) in self.coll.items():
            coll_str[op], group[op], coll_bytes[op], splits[op], seq[op] = c, g, b, sp, q
        nbytes = coll_bytes.copy()
        for op, b in self.bytes.items():
            nbytes[op] = b
        deps = [sorted(set(d)) if len(d) > 1 else d for d in self.deps]
        lengths = np.fromiter((len(d) for d in deps), dtype=np.int64, count=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((x for d in deps for x in d), dtype=np.int64, count=int(offsets[-1]))
        return {
            "lane": self.lane,
            "kind": self.kind,
            "name": self.name,
            "label": self.label,
            "start_us": np.asarray(self.start, dtype=np.float64),
            "dur_us": np.asarray(self.dur, dtype=np.float64),
            "bytes": nbytes,
            "coll": coll_str,
            "group": group,
            "coll_bytes": coll_bytes,
            "splits": splits,
            "seq": seq,
            "step": np.asarray(self.step, dtype=np.int32),
            "deps_offsets": offsets,
            "deps_flat": flat,
        }
