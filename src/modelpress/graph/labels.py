"""Dependency propagation: which parameter slices must change together.

Every parameter axis that carries channels gets a range of integer ids ("elements"). We walk the
aten graph of ``torch.export`` and push an integer *label tensor* (same shape as the real value,
-1 where no channel flows) through every node. Shape ops (view, transpose, split, cat, ...) are
applied to the label tensor itself, so index mappings through reshapes, fused qkv splits and
concatenations come out exact without per-op bookkeeping. Ops that mix channels (linear, conv,
norms, elementwise with two channel inputs, matmul contractions) union elements in a union-find.
Attention batch axes (the head axis of q, k and v) couple whole slices: that is how heads appear.
A key/value tensor with fewer heads than the queries (grouped-query attention, with or without an
explicit repeat) couples key/value head j with the query heads that read it, so one unit is one
key/value head together with its query heads; the propagation records how many query and key/value
heads each such unit holds.

Tied parameters (one tensor under two names, e.g. input embedding and LM head) are one parameter: every
alias maps to the first name ``state`` lists for that tensor. Rows of an embedding table are addressed by
token ids (a model input), so they are fixed if any other use gives them a channel space (a tied LM
head's output rows). Rotary position tables (``cos``/``sin`` of position x frequency) carry no channels:
their frequency buffer is fixed, and multiplying q and k by them couples nothing, so whole heads stay
removable while ``head_dim`` is never cut (no group splits a head).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch

aten = torch.ops.aten


class UnionFind:
    """Union-find over integer element ids, grown on demand."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def grow(self, n: int) -> None:
        old = len(self.parent)
        if n > old:
            self.parent = np.concatenate([self.parent, np.arange(old, n, dtype=np.int64)])

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union a[i] with b[i] for every i where both are valid ids."""
        a = np.asarray(a).reshape(-1)
        b = np.asarray(b).reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not keep.any():
            return
        pairs = np.unique(np.stack([a[keep], b[keep]], 1), axis=0)
        for x, y in pairs:
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def union_all(self, ids: np.ndarray) -> int | None:
        ids = np.unique(np.asarray(ids).reshape(-1))
        ids = ids[ids >= 0]
        if len(ids) == 0:
            return None
        first = np.full(len(ids) - 1, ids[0])
        self.union_pairs(first, ids[1:])
        return int(ids[0])

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class Space:
    """One channel-carrying axis of one parameter (or buffer)."""

    param: str
    axis: int
    size: int
    start: int
    role: str = ""  # "in": read (contracted) by a Linear/conv/matmul; "out": written by one


@dataclass
class Propagation:
    """Result of dependency propagation over one traced model."""

    spaces: list[Space]
    roots: np.ndarray  # component root per element id
    pinned: np.ndarray  # bool per element: touches a model input or an op we cannot follow
    at_output: np.ndarray  # bool per element: reaches a model output (editing changes the output width)
    head_ids: np.ndarray  # bool per element: coupled through an attention head axis
    opaque_ops: list[str] = field(default_factory=list)
    # per element of a head component: query heads / key-value heads in that component (0 elsewhere);
    # 1 / 1 for multi-head attention, n / 1 for grouped-query attention with n queries per key/value head
    query_heads: np.ndarray | None = None
    kv_heads: np.ndarray | None = None


    def without(self, drop: dict[tuple[str, int], np.ndarray]) -> Propagation:
        """The propagation after removing positions ``drop[(param, axis)]``, without re-tracing.

        Removed positions are whole components (units) or, for a head width, part of a head's
        component; each kept component's root becomes its smallest kept element.
        """
        keep = np.ones(len(self.roots), dtype=bool)
        spaces: list[Space] = []
        start = 0
        for s in self.spaces:
            gone = drop.get((s.param, s.axis))
            if gone is not None and len(gone):
                keep[s.start + np.asarray(gone, dtype=np.int64)] = False
            size = s.size - (0 if gone is None else len(np.unique(gone)))
            spaces.append(Space(s.param, s.axis, size, start, s.role))
            start += size
        new_id = np.cumsum(keep) - 1
        old_roots = self.roots[keep]
        ids = new_id[keep]
        first = np.full(len(self.roots), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, old_roots, ids)  # smallest kept element of each component
        return Propagation(
            spaces,
            first[old_roots],
            self.pinned[keep],
            self.at_output[keep],
            self.head_ids[keep],
            list(self.opaque_ops),
            None if self.query_heads is None else self.query_heads[keep],
            None if self.kv_heads is None else self.kv_heads[keep],
        )


_PASS_THROUGH = {
    "dropout", "clone", "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "lift_fresh_copy",
    "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "erf", "neg", "sqrt", "rsqrt", "exp", "log",
    "abs", "softmax", "_softmax", "log_softmax", "_log_softmax", "hardtanh", "hardswish", "hardsigmoid",
    "clamp", "clamp_min", "clamp_max", "leaky_relu", "elu", "mish", "pow", "masked_fill", "fill",
    "native_dropout", "celu", "softplus", "gelu_", "silu_", "hardtanh_", "reciprocal", "square",
    "float", "_assert_tensor_metadata", "bitwise_not", "logical_not", "zeros_like", "ones_like",
}
_ELEMENTWISE = {"add", "sub", "mul", "div", "where", "maximum", "minimum", "rsub", "add_", "mul_", "lerp"}
_SHAPE = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "unsqueeze", "squeeze", "flatten",
    "expand", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "movedim",
    "unflatten", "repeat", "expand_as", "view_as", "reshape_as", "swapaxes", "roll", "flip",
}
# padding: padded positions carry no channel (-1); a pad along a channel axis leaves its readers pinned there
_PAD = {"pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d"}
# periodic functions of positions (rotary tables): inputs pinned, output carries no channels
_POSITIONAL = {"cos", "sin"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "max", "min", "prod"}
_POOL = {
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool1d", "avg_pool1d",
    "adaptive_avg_pool1d", "upsample_nearest2d", "upsample_bilinear2d", "max_pool2d_with_indices",
    "_adaptive_avg_pool2d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_nearest1d", "upsample_nearest3d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
    "_upsample_bicubic2d_aa", "_upsample_nearest_exact2d", "_upsample_nearest_exact1d", "avg_pool3d", "max_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
}
# gathers along axes whose positions carry no channels (bias tables read by an index buffer)
_INDEX = {"index", "_unsafe_index", "index_select", "gather"}
_NORM_LAST = {"layer_norm", "native_layer_norm", "rms_norm"}
_NORM_CHANNEL = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                 "native_batch_norm", "instance_norm"}
_IGNORE_OUTPUT = {"arange", "new_ones", "zeros", "ones", "full", "scalar_tensor", "empty", "ge", "gt", "le",
                  "lt", "eq", "ne", "__and__", "__or__", "bitwise_and", "bitwise_or", "cumsum", "sym_size",
                  "_local_scalar_dense", "any", "all", "isnan", "new_zeros", "new_full", "empty_like", "sym_numel",
                  "argmax"}


def _opname(target: object) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("__"):
        name = name[:-1]  # in-place variants behave like their functional ops here
    return name


class _Propagator:
    def __init__(self, exported: torch.export.ExportedProgram, state: dict[str, torch.Tensor]) -> None:
        self.ep = exported
        self.state = state
        canonical: dict[int, str] = {}
        self.alias = {name: canonical.setdefault(id(t), name) for name, t in state.items()}
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.space_index: dict[tuple[str, int], int] = {}
        self.n = 0
        self.pinned: list[np.ndarray] = []
        self.pinned_out: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        # per coupling of an attention head axis: each query slice's element id and its key/value keys
        self.head_events: list[tuple[np.ndarray, list[tuple[int, ...]]]] = []
        self.tables: list[str] = []  # embedding tables (rows addressed by token ids)
        self.opaque: list[str] = []
        sig = exported.graph_signature
        self.param_of: dict[str, str] = {}
        self.param_of.update(sig.inputs_to_parameters)
        self.param_of.update(sig.inputs_to_buffers)
        self.param_of = {node: self.alias.get(name, name) for node, name in self.param_of.items()}
        self.labels: dict[str, object] = {}

    # ----- element ids -----
    def space(self, param: str, axis: int, role: str = "") -> np.ndarray:
        key = (param, axis)
        if key not in self.space_index:
            size = int(self.state[param].shape[axis])
            self.space_index[key] = len(self.spaces)
            self.spaces.append(Space(param, axis, size, self.n))
            self.n += size
            self.uf.grow(self.n)
        s = self.spaces[self.space_index[key]]
        s.role = s.role or role
        return np.arange(s.start, s.start + s.size, dtype=np.int64)

    def pin(self, label: object, output: bool = False) -> None:
        for t in _tensors(label):
            ids = t.numpy().reshape(-1)
            ids = np.unique(ids[ids >= 0])
            if len(ids):
                (self.pinned_out if output else self.pinned).append(ids)

    # ----- label helpers -----
    def label_of(self, arg: object) -> object:
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.labels:
                return self.labels[arg.name]
            return None
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.label_of(a) for a in arg)
        return arg

    def param_label(self, node: torch.fx.Node, skip: tuple[int, ...] = ()) -> torch.Tensor | None:
        """Generic label of a parameter used outside linear/conv/norm: its last axis of size > 1.

        ``skip``: axes that carry positions, not channels (the rows of a table read through an index),
        so the channel axis is the last of the others (the head axis of a relative-position bias table).
        """
        name = self.param_of[node.name]
        t = self.state[name]
        if t.dim() == 0 or not t.is_floating_point():
            return None
        axes = [a for a in range(t.dim()) if t.shape[a] > 1 and a not in skip]
        if not axes:
            return None
        axis = axes[-1]
        ids = torch.from_numpy(self.space(name, axis))
        shape = [1] * t.dim()
        shape[axis] = -1
        return ids.view(shape).expand(t.shape).clone()

    @staticmethod
    def full(node: torch.fx.Node, value: int = -1) -> object:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.full(tuple(int(s) for s in val.shape), value, dtype=torch.int64)
        if isinstance(val, (list, tuple)):
            return type(val)(
                torch.full(tuple(int(s) for s in v.shape), value, dtype=torch.int64)
                if isinstance(v, torch.Tensor) else None for v in val
            )
        return None

    def canon(self, label: torch.Tensor) -> torch.Tensor:
        """The label with every id replaced by its current component root (for constancy checks)."""
        arr = label.numpy()
        uniq, inv = np.unique(arr, return_inverse=True)
        roots = np.array([self.uf.find(int(u)) if u >= 0 else -1 for u in uniq], dtype=np.int64)
        return torch.from_numpy(roots[inv].reshape(arr.shape))

    def channel_vector(self, label: torch.Tensor, axis: int) -> np.ndarray | None:
        """Ids along ``axis`` if the label is constant across all other axes (up to unions), else None."""
        axis = axis % label.dim()
        label = self.canon(label)
        moved = label.movedim(axis, -1).reshape(-1, label.shape[axis])
        first = moved[0]
        if not bool((moved == first).all()):
            return None
        return first.numpy().copy()

    def weight_space(self, node: object, axis: int, role: str = "") -> np.ndarray | None:
        if isinstance(node, torch.fx.Node) and node.name in self.param_of:
            return self.space(self.param_of[node.name], axis, role)
        return None

    def bind_bias(self, bias: object, out_ids: np.ndarray) -> None:
        ids = self.weight_space(bias, 0)
        if ids is not None:
            self.uf.union_pairs(ids, out_ids)

    def consume(self, x: torch.Tensor | None, axis: int, ids: np.ndarray | None) -> None:
        """Channels of x along axis feed parameter slice ids: union them (or pin ids if x is unlabelled)."""
        if ids is None:
            if x is not None:
                self.pin(x)
            return
        if x is None:
            self.pinned.append(ids)
            return
        vec = self.channel_vector(x, axis)
        if vec is None:
            self.pin(x)
            self.pinned.append(ids)
            return
        if (vec < 0).all():
            self.pinned.append(ids)
            return
        self.uf.union_pairs(vec, ids)
        missing = vec < 0
        if missing.any():
            self.pinned.append(ids[missing])

    # ----- main loop -----
    def run(self) -> Propagation:
        graph = self.ep.graph_module.graph
        for node in graph.nodes:
            if node.op == "placeholder":
                self.labels[node.name] = None if node.name in self.param_of else self.full(node)
            elif node.op == "call_function":
                try:
                    self.labels[node.name] = self.visit(node)
                except Exception as exc:  # an op we cannot follow: pin what flows into it
                    self.opaque.append(f"{_opname(node.target)} ({type(exc).__name__})")
                    for a in node.all_input_nodes:
                        self.pin(self.labels.get(a.name))
                    self.labels[node.name] = self.full(node)
            elif node.op == "output":
                for a in node.all_input_nodes:
                    self.pin(self.labels.get(a.name), output=True)
            else:
                self.labels[node.name] = self.full(node)
            if node.op == "call_function" and not node.users and isinstance(node.meta.get("val"), torch.Tensor):
                # dead end: its channels are used outside the traced output
                self.pin(self.labels.get(node.name))
        for table in self.tables:
            if (table, 0) in self.space_index:
                self.pinned.append(self.space(table, 0))
        roots = self.uf.roots()
        pinned = self._spread(self.pinned, roots)
        at_output = self._spread(self.pinned_out, roots)
        head = np.zeros(self.n, dtype=bool)
        for ids in self.heads:
            head[ids] = True
        head = np.isin(roots, np.unique(roots[head])) if head.any() else head
        query, kv = self._head_counts(roots)
        return Propagation(self.spaces, roots, pinned, at_output, head, sorted(set(self.opaque)), query, kv)

    def _head_counts(self, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per element: query heads and distinct key/value heads coupled into its component."""
        query = np.zeros(self.n, dtype=np.int64)
        kv = np.zeros(self.n, dtype=np.int64)
        for reps, keys in self.head_events:
            slices: dict[int, int] = {}
            distinct: dict[int, set] = {}
            for rep, key in zip(reps.tolist(), keys, strict=True):
                if rep < 0:
                    continue
                r = int(roots[rep])
                slices[r] = slices.get(r, 0) + 1
                distinct.setdefault(r, set()).add(key)
            for r, count in slices.items():
                query[r] = max(query[r], count)
                kv[r] = max(kv[r], len(distinct[r]))
        return query[roots], kv[roots]

    def _spread(self, id_lists: list[np.ndarray], roots: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.n, dtype=bool)
        for ids in id_lists:
            mask[ids] = True
        return np.isin(roots, np.unique(roots[mask])) if mask.any() else mask

    def arg_label(self, node: torch.fx.Node, i: int) -> torch.Tensor | None:
        if i >= len(node.args):
            return None
        a = node.args[i]
        if isinstance(a, torch.fx.Node) and a.name in self.param_of:
            return self.param_label(a)
        lab = self.label_of(a)
        return lab if isinstance(lab, torch.Tensor) else None

    def visit(self, node: torch.fx.Node) -> object:
        op = _opname(node.target)
        args = node.args
        if op == "getitem":
            src = self.label_of(args[0])
            return None if src is None else src[args[1]]
        if op in _IGNORE_OUTPUT:
            return self.full(node)
        if op == "linear":
            return self.visit_linear(node)
        if op in ("conv2d", "conv1d", "convolution", "conv3d"):
            return self.visit_conv(node)
        if op in ("mm", "bmm", "matmul", "addmm", "baddbmm"):
            return self.visit_matmul(node, op)
        if op == "scaled_dot_product_attention":
            return self.visit_sdpa(node)
        if op == "embedding":
            if _is_param(self, args[0]):
                self.tables.append(self.param_of[args[0].name])
            ids = self.weight_space(args[0], 1)
            out = self.full(node)
            if ids is None:
                return out
            return torch.from_numpy(ids).expand(out.shape).clone()
        if op in _NORM_LAST:
            x = self.arg_label(node, 0)
            vec_ids = [self.weight_space(args[i], 0) for i in (2, 3) if i < len(args)]
            if op == "rms_norm":
                vec_ids = [self.weight_space(args[2], 0)] if len(args) > 2 else []
            vec_ids = [v for v in vec_ids if v is not None]
            for v in vec_ids[1:]:
                self.uf.union_pairs(vec_ids[0], v)
            if vec_ids:
                self.consume(x, -1, vec_ids[0])
            out = x.clone() if x is not None else self.full(node)
            return (out, None, None) if op == "native_layer_norm" else out
        if op in _NORM_CHANNEL:
            x = self.arg_label(node, 0)
            vec_ids = [self.weight_space(a, 0) for a in args[1:5]]
            vec_ids = [v for v in vec_ids if v is not None]
            for v in vec_ids[1:]:
                self.uf.union_pairs(vec_ids[0], v)
            if vec_ids:
                self.consume(x, 1, vec_ids[0])
            out = x.clone() if x is not None else self.full(node)
            return out if op in ("batch_norm", "instance_norm") else (out, None, None)
        if op in _SHAPE or op in ("cat", "stack"):
            return self.visit_shape(node, op)
        if op in _INDEX:
            return self.visit_index(node, op)
        if op in _PAD:
            return self.visit_pad(node, op)
        if op in _POSITIONAL:
            for a in node.all_input_nodes:
                self.pin(self.arg_label_direct(a))
            return self.full(node)
        if op in _PASS_THROUGH:
            x = self.arg_label(node, 0)
            if x is None:
                return self.full(node)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and tuple(val.shape) != tuple(x.shape):
                return x.expand(tuple(val.shape)).clone()
            return x.clone()
        if op in _ELEMENTWISE:
            return self.visit_elementwise(node)
        if op in _REDUCE:
            return self.visit_reduce(node)
        if op in _POOL:
            x = self.arg_label(node, 0)
            out = self.full(node)
            if x is None:
                return out
            vec = self.channel_vector(x, 1)
            if vec is None:
                raise ValueError("pool over mixed labels")
            shape = [1] * out.dim()
            shape[1] = -1
            res = torch.from_numpy(vec).view(shape).expand(out.shape).clone()
            return (res, None) if isinstance(out, tuple) else res
        # unknown op: pin anything with channels that flows in
        labelled = [self.labels.get(a.name) for a in node.all_input_nodes]
        if any(t is not None and bool((t >= 0).any()) for lab in labelled for t in _tensors(lab)):
            self.opaque.append(op)
            for lab in labelled:
                self.pin(lab)
        return self.full(node)

    def visit_index(self, node: torch.fx.Node, op: str) -> torch.Tensor:
        """A gather along axes that carry no channels: the labels of the other axes follow the rows.

        The labels must be constant along the gathered axes (a per-head bias table read by a position
        index: its head axis keeps its ids, whatever the index holds), so gathering with zero indices of
        the same shapes gives the output's labels. A gather that picks channels raises (pinned).
        """
        src = node.args[0]
        ndim = len(node.args[0].meta["val"].shape)
        if op in ("index", "_unsafe_index"):
            index = list(node.args[1])
            axes = tuple(i for i, a in enumerate(index) if a is not None)
        else:
            index = [node.args[2]]
            axes = (int(node.args[1]) % ndim,)
        x = self.param_label(src, axes) if _is_param(self, src) else self.arg_label_direct(src)
        if x is None:
            return self.full(node)
        x = self.canon(x)
        if not all(_constant(x, a) for a in axes):
            raise ValueError("an index picks channels")
        metas = [a.meta["val"] if isinstance(a, torch.fx.Node) else None for a in index]
        if any(m is not None and m.dtype == torch.bool for m in metas):
            raise ValueError("a boolean mask picks positions")
        zeros = [None if m is None else torch.zeros(tuple(int(d) for d in m.shape), dtype=torch.long) for m in metas]
        if op in ("index", "_unsafe_index"):
            return aten.index.Tensor(x, zeros).clone()
        if op == "index_select":
            return torch.index_select(x, axes[0], zeros[0]).clone()
        return torch.gather(x, axes[0], zeros[0]).clone()

    def visit_pad(self, node: torch.fx.Node, op: str) -> torch.Tensor:
        """Pad the label itself (as floats, exact for ids): constant padding adds -1, reflection copies ids."""
        x = self.arg_label_direct(node.args[0])
        if x is None:
            return self.full(node)
        args = list(node.args[1:])
        if op == "constant_pad_nd" or (op == "pad" and (len(args) < 2 or args[1] in (None, "constant"))):
            out = torch.nn.functional.pad(x.double(), list(args[0]), value=-1.0)
        else:
            mode = args[1] if op == "pad" else ("reflect" if op.startswith("reflection") else "replicate")
            out = torch.nn.functional.pad(x.double().unsqueeze(0), list(args[0]), mode=mode).squeeze(0)
        return out.round().long()

    def visit_linear(self, node: torch.fx.Node) -> torch.Tensor:
        x = self.arg_label(node, 0)
        w = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        out = self.full(node)
        w_out = self.weight_space(w, 0, "out")
        w_in = self.weight_space(w, 1, "in")
        if w_out is None:  # weight is an activation: treat as x @ w.T
            wl = self.arg_label(node, 1)
            self.pin(x)
            self.pin(wl)
            return out
        self.consume(x, -1, w_in)
        self.bind_bias(bias, w_out)
        return torch.from_numpy(w_out).expand(out.shape).clone()

    def visit_conv(self, node: torch.fx.Node) -> torch.Tensor:
        x = self.arg_label(node, 0)
        w = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        groups = int(node.args[-1]) if isinstance(node.args[-1], int) else 1
        out = self.full(node)
        w_out = self.weight_space(w, 0, "out")
        if w_out is None:
            self.pin(x)
            return out
        if groups == 1:
            self.consume(x, 1, self.weight_space(w, 1, "in"))
        else:
            self.couple_conv_groups(x, w_out, groups)
        self.bind_bias(bias, w_out)
        shape = [1] * out.dim()
        shape[1] = -1
        return torch.from_numpy(w_out).view(shape).expand(out.shape).clone()

    def couple_conv_groups(self, x: torch.Tensor | None, w_out: np.ndarray, groups: int) -> None:
        """Grouped convolution: a unit is one whole group (its input channels and its output rows).

        Depthwise convolutions (one input channel per group) couple input channel c with its output
        rows; removing a unit removes a whole group, and the edit lowers ``groups`` to match.
        """
        n_out = len(w_out)
        vec = self.channel_vector(x, 1) if x is not None else None
        if vec is None or n_out % groups or len(vec) % groups:
            self.pin(x)
            self.pinned.append(w_out)
            return
        per_in, per_out = len(vec) // groups, n_out // groups
        head_in = w_out[(np.arange(len(vec)) // per_in) * per_out]
        self.uf.union_pairs(vec, head_in)
        self.uf.union_pairs(w_out, w_out[(np.arange(n_out) // per_out) * per_out])
        unlabelled = (vec < 0).reshape(groups, per_in).any(1)
        if unlabelled.any():
            self.pinned.append(w_out.reshape(groups, per_out)[unlabelled].reshape(-1))

    def couple_heads(self, operands: list[torch.Tensor], nbatch: int) -> dict[int, torch.Tensor] | None:
        """Union whole slices along attention batch axes (heads); returns a representative label per axis.

        ``operands[0]`` holds the queries (or attention weights), the others keys/values. An operand
        with fewer heads than the axis (grouped-query attention) is read by consecutive query heads:
        query head i reads its head ``i * heads // size``.
        """
        reps: dict[int, torch.Tensor] = {}
        for axis in range(nbatch):
            sizes = {t.shape[axis] for t in operands if t.dim() > axis}
            size = max(sizes)
            if size <= 1:
                continue
            if any(size % s for s in sizes):
                raise ValueError(f"attention head axes of sizes {sorted(sizes)} do not divide")
            varies = any(
                t.shape[axis] > 1 and not bool((t.select(axis, 0) == t.select(axis, 1)).all())
                for t in operands
            )
            if not varies:
                continue
            rep = torch.full((size,), -1, dtype=torch.int64)
            keys: list[tuple[int, ...]] = []
            for i in range(size):
                ids = [t.select(axis, i * t.shape[axis] // size).numpy() for t in operands]
                flat = np.concatenate([a.reshape(-1) for a in ids])
                r = self.uf.union_all(flat)
                keys.append(tuple(int(a[a >= 0].min()) if (a >= 0).any() else -1 for a in ids[1:]))
                if r is not None:
                    rep[i] = r
                    self.heads.append(np.unique(flat[flat >= 0]))
            self.head_events.append((rep.numpy().copy(), keys))
            reps[axis] = rep
        return reps

    def visit_sdpa(self, node: torch.fx.Node) -> torch.Tensor:
        q, k, v = (self.arg_label(node, i) for i in range(3))
        out = self.full(node)
        if q is None or k is None or v is None:
            for t in (q, k, v):
                self.pin(t)
            return out
        q, k, v = self.canon(q), self.canon(k), self.canon(v)
        k, v = _repeat_heads(k, q), _repeat_heads(v, q)  # grouped-query attention (enable_gqa)
        if not _constant(q, -2) or not _constant(k, -2):
            raise ValueError("attention inputs vary along the sequence axis")
        qd, kd = q.select(-2, 0).unsqueeze(-2), k.select(-2, 0).unsqueeze(-2)
        a, b = torch.broadcast_tensors(qd, kd)
        self.uf.union_pairs(a.numpy(), b.numpy())
        self.couple_heads([q, k, v, *self.sdpa_mask(node, q.dim())], q.dim() - 2)
        vv = v.select(-2, 0).unsqueeze(-2)
        return vv.expand(out.shape).clone()

    def sdpa_mask(self, node: torch.fx.Node, dims: int) -> list[torch.Tensor]:
        """The labels of sdpa's additive mask, as [batch, heads, queries, keys], if it carries channels.

        A per-head bias passed as the mask (T5 computes one from a table and passes it to every layer)
        adds to head h's scores, so its head h and the table column it came from join head h's unit.
        """
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        label = self.label_of(mask) if isinstance(mask, torch.fx.Node) else None
        if not isinstance(label, torch.Tensor) or not bool((label >= 0).any()) or label.dim() > dims:
            return []
        return [self.canon(label.reshape((1,) * (dims - label.dim()) + tuple(label.shape)))]

    def visit_matmul(self, node: torch.fx.Node, op: str) -> torch.Tensor:
        out = self.full(node)
        ai, bi = (1, 2) if op in ("addmm", "baddbmm") else (0, 1)
        a_node, b_node = node.args[ai], node.args[bi]
        a = self.arg_label(node, ai) if not _is_param(self, a_node) else None
        b = self.arg_label(node, bi) if not _is_param(self, b_node) else None
        if _is_param(self, b_node):  # x @ W with W [in, out]
            self.consume(a, -1, self.weight_space(b_node, 0, "in"))
            w_out = self.weight_space(b_node, 1, "out")
            if op == "addmm":
                self.bind_bias(node.args[0], w_out)
            return torch.from_numpy(w_out).expand(out.shape).clone()
        if _is_param(self, a_node) or a is None or b is None:
            for t in (a, b):
                self.pin(t)
            return out
        nb = max(a.dim(), b.dim()) - 2
        a, b = self.canon(a), self.canon(b)
        # contraction: a[..., m, k] with every b[..., k, n]
        if a.dim() < 2 or b.dim() < 2 or not _constant(a, -2):
            raise ValueError("matmul's left operand varies along its rows")
        x, y = torch.broadcast_tensors(a.select(-2, 0).unsqueeze(-1), b)
        self.uf.union_pairs(x.numpy(), y.numpy())
        reps = self.couple_heads([a, b], nb)
        b_n = b.select(-2, 0)  # [..., n]
        if bool((b_n != b_n[..., :1]).any()):
            return b_n.unsqueeze(-2).expand(out.shape).clone()
        res = out.clone()
        for axis, rep in (reps or {}).items():
            shape = [1] * out.dim()
            shape[axis] = -1
            res = rep.view(shape).expand(out.shape).clone()
        return res

    def visit_elementwise(self, node: torch.fx.Node) -> torch.Tensor:
        op = _opname(node.target)
        idx = (1, 2) if op == "where" else (0, 1)
        labs = [self.arg_label(node, i) for i in idx]
        labs = [t for t in labs if isinstance(t, torch.Tensor)]
        out = self.full(node)
        if not labs:
            return out
        if len(labs) == 1:
            return labs[0].expand(out.shape).clone() if labs[0].dim() <= out.dim() else out
        a, b = torch.broadcast_tensors(labs[0], labs[1])
        self.uf.union_pairs(a.numpy(), b.numpy())
        if op in ("add", "sub", "rsub"):
            self.pin_unmatched(labs[0], labs[1])
            self.pin_unmatched(labs[1], labs[0])
        return torch.where(a >= 0, a, b).expand(out.shape).clone()

    def pin_unmatched(self, x: torch.Tensor, other: torch.Tensor) -> None:
        """Channels of ``x`` added to positions of ``other`` that carry none (a table of fixed width, a
        residual whose axis holds tokens) cannot shrink: ``other`` keeps its size along that axis."""
        nd = max(x.dim(), other.dim())
        xs = x.reshape((1,) * (nd - x.dim()) + tuple(x.shape))
        os_ = other.reshape((1,) * (nd - other.dim()) + tuple(other.shape))
        if not (os_ < 0).any():
            return
        for d in range(nd):
            if xs.shape[d] > 1 and os_.shape[d] > 1 and not _constant(xs, d):
                a, b = torch.broadcast_tensors(xs, os_)
                self.pin(a[(b < 0) & (a >= 0)])
                return

    def visit_reduce(self, node: torch.fx.Node) -> torch.Tensor:
        x = self.arg_label(node, 0)
        out = self.full(node)
        if x is None or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple, int)):
            return out
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        keep = bool(node.args[2]) if len(node.args) > 2 and isinstance(node.args[2], bool) else False
        res = self.canon(x)
        for d in sorted((int(d) % x.dim() for d in dims), reverse=True):
            first = self.reduce_axis(res, d)
            res = first.unsqueeze(d) if keep else first
        if tuple(res.shape) != tuple(out.shape):
            return out
        return res.clone()

    def reduce_axis(self, label: torch.Tensor, axis: int) -> torch.Tensor:
        """Labels after reducing ``axis``: kept where constant along it; where every position reduces
        the same set of channels (a mean over all channels) nothing flows on; where positions reduce
        different sets (the mean of two stacked classifier outputs), each set is coupled and flows on."""
        moved = label.movedim(axis, -1)
        rows = moved.reshape(-1, moved.shape[-1]).numpy()
        first = rows[:, 0]
        if (rows == first[:, None]).all():
            return torch.from_numpy(first.copy()).view(moved.shape[:-1])
        ordered = np.sort(rows, axis=1)
        if (ordered == ordered[:1]).all():
            return torch.full(tuple(moved.shape[:-1]), -1, dtype=torch.int64)
        top = rows.max(axis=1)
        for j in range(rows.shape[1]):
            self.uf.union_pairs(top, rows[:, j])
        return torch.from_numpy(top.copy()).view(moved.shape[:-1])

    def visit_shape(self, node: torch.fx.Node, op: str) -> object:
        args = list(node.args)
        first = args[0]
        if op in ("cat", "stack"):
            parts = []
            for a in first:
                lab = self.arg_label_direct(a)
                parts.append(lab)
            val = node.meta["val"]
            shapes = [tuple(int(s) for s in p.meta["val"].shape) for p in first]
            parts = [p if p is not None else torch.full(s, -1, dtype=torch.int64) for p, s in zip(parts, shapes, strict=True)]
            res = getattr(torch, op)(parts, *args[1:], **node.kwargs)
            assert tuple(res.shape) == tuple(val.shape)
            return res
        x = self.arg_label_direct(first)
        if x is None:
            return self.full(node)
        rest = [self.label_of(a) if isinstance(a, torch.fx.Node) else a for a in args[1:]]
        res = node.target(x, *rest, **node.kwargs)
        if isinstance(res, torch.Tensor):
            return res.clone()
        return type(res)(r.clone() for r in res)

    def arg_label_direct(self, a: object) -> torch.Tensor | None:
        if isinstance(a, torch.fx.Node) and a.name in self.param_of:
            return self.param_label(a)
        lab = self.label_of(a)
        return lab if isinstance(lab, torch.Tensor) else None


def _repeat_heads(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with each head repeated for the query heads that read it, on batch axes ``like`` has more of."""
    for axis in range(min(t.dim(), like.dim()) - 2):
        n, size = t.shape[axis], like.shape[axis]
        if 1 < n < size and size % n == 0:
            t = t.repeat_interleave(size // n, dim=axis)
    return t


def _constant(label: torch.Tensor, axis: int) -> bool:
    return bool((label == label.select(axis, 0).unsqueeze(axis % label.dim())).all())


def _is_param(p: _Propagator, node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.name in p.param_of


def _tensors(label: object) -> list[torch.Tensor]:
    if isinstance(label, torch.Tensor):
        return [label]
    if isinstance(label, (list, tuple)):
        return [t for item in label for t in _tensors(item)]
    return []


def propagate(exported: torch.export.ExportedProgram, state: dict[str, torch.Tensor]) -> Propagation:
    """Run dependency propagation over an exported program; ``state`` maps names to parameters/buffers."""
    return _Propagator(exported, state).run()
