"""The joint state, the ONE jitted train step that updates every trainable group (run K steps per call), and
the eval step.

Pure functions over a :class:`JointState` pytree. The step takes the raw uint8 batch: augmentation,
normalisation and the student's low-resolution view all happen on device inside the same jit,
keyed by (seed, step) so any step is reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ekd_jax import evaluation, losses, parallel
from ekd_jax.cpu_convs import canonical_convs
from ekd_jax.guided import GuidedModules, select_pairs
from ekd_jax.methods import Method, Outputs, get_method, total_loss
from ekd_jax.models import DTYPES, STAGE_SLICE, create_model
from ekd_jax.spec import LossSpec

GROUPS = ("teacher", "student", "guide")
# views(images_uint8, key, train) -> (teacher_x, student_x), jit-traceable.
ViewFn = Callable[[jax.Array, jax.Array | None, bool], tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class JointState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]  # {'teacher', 'student', 'guide'}
    batch_stats: dict[str, Any]  # same groups
    opt_state: optax.OptState  # one optax state, a transform per group
    rng: jax.Array  # uint32 key data; batch keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The static part of a run: modules, method, stage pairing, loss settings, views."""

    method: Method
    teacher: nn.Module
    student: nn.Module
    guides: GuidedModules | None
    pairs: tuple[tuple[int, int], ...]  # (student_stage, teacher_stage) used by guides / AT
    loss_cfg: LossSpec
    views: ViewFn
    total_steps: int
    teacher_input_shape: tuple[int, int, int]
    student_input_shape: tuple[int, int, int]
    # Teacher head start: optimizer steps in which only the online teacher learns; the student and
    # the guided modules start at this step (config teacher.head_start). total_steps counts
    # the student's steps, so transfer ramps follow the student's progress.
    student_start: int = 0

    @property
    def trainable(self) -> dict[str, bool]:
        m = self.method
        return {"teacher": m.teacher_trainable, "student": m.runs_student, "guide": self.guides is not None}


def _feature_shapes(model, input_shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct((2, *input_shape), dtype)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    _, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return [tuple(f.shape[1:]) for f in feats]


def build_networks(
    spec,
    num_classes: int,
    teacher_input_shape,
    student_input_shape,
    views: ViewFn,
    total_steps: int,
    student_start: int = 0,
) -> Networks:
    """The modules of a run (nothing compiled yet), from its validated :class:`ekd_jax.spec.Spec`.
    (``ekd_jax.build.build`` calls this with the data's facts; it is the one place that does.)"""
    method = get_method(spec.method)
    dtype = DTYPES[spec.dtype]
    teacher = create_model(spec.teacher.model, num_classes, dtype=dtype)
    student = create_model(spec.student.model, num_classes, dtype=dtype)
    t_stages = _feature_shapes(teacher, teacher_input_shape)[STAGE_SLICE]
    s_stages = _feature_shapes(student, student_input_shape)[STAGE_SLICE]

    guides, pairs = None, ()
    if method.guide == "config" or method.name == "at":
        pairs = tuple(select_pairs(len(s_stages), len(t_stages), spec.guided.stages))
    if method.guide == "adapter_hint":
        pairs = tuple(select_pairs(len(s_stages), len(t_stages), (spec.guided.hint_stage,)))
    if method.guide is not None:
        guides = GuidedModules(
            kind="adapter" if method.guide == "adapter_hint" else spec.guided.type,
            teacher_shapes=tuple(t_stages[t] for _, t in pairs),
            num_classes=num_classes,
            dtype=dtype,
            teacher_backbone_grad=bool(spec.guided.aux_teacher_backbone_grad),
        )
    return Networks(
        method=method,
        teacher=teacher,
        student=student,
        guides=guides,
        pairs=pairs,
        loss_cfg=spec.loss,
        views=views,
        total_steps=int(total_steps),
        student_start=int(student_start),
        teacher_input_shape=tuple(teacher_input_shape),
        student_input_shape=tuple(student_input_shape),
    )


def make_optimizer(
    nets: Networks,
    learning_rate: optax.Schedule,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    teacher_learning_rate: optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """SGD with coupled weight decay (PyTorch style) for trainable groups; frozen groups get none.

    With a teacher head start (``nets.student_start > 0``) the teacher follows
    ``teacher_learning_rate`` (its own, longer run) under its own label; the head-start steps
    update only that label's state, so the student's and guides' SGD state (step count, momentum)
    is untouched until they start and their schedule ``learning_rate`` starts at its step 0.
    """

    def sgd(lr):
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(lr, momentum=momentum or None, nesterov=nesterov),
        )

    trainable = nets.trainable
    transforms = {"train": sgd(learning_rate), "frozen": optax.set_to_zero()}
    own_teacher = nets.student_start > 0 or teacher_learning_rate is not None
    if own_teacher:
        transforms["teacher"] = sgd(teacher_learning_rate if teacher_learning_rate is not None else learning_rate)

    def label(g):
        if not trainable[g]:
            return "frozen"
        return "teacher" if own_teacher and g == "teacher" else "train"

    def labels(params):
        return {g: jax.tree_util.tree_map(lambda _: label(g), params[g]) for g in params}

    return optax.multi_transform(transforms, labels)


def init_state(nets: Networks, tx: optax.GradientTransformation, seed: int, mesh=None) -> JointState:
    """Initialises all groups in one jit (fast, and replicated over the mesh)."""
    mesh = mesh or parallel.make_mesh()

    def init(key):
        kt, ks, kg = jax.random.split(key, 3)
        xt = jnp.zeros((2, *nets.teacher_input_shape), jnp.float32)
        xs = jnp.zeros((2, *nets.student_input_shape), jnp.float32)
        tv = nets.teacher.init(kt, xt, train=False)
        sv = nets.student.init(ks, xs, train=False)
        gv = {"params": {}, "batch_stats": {}}
        if nets.guides is not None:
            _, tf = nets.teacher.apply(tv, xt, train=False)
            _, sf = nets.student.apply(sv, xs, train=False)
            smaps, tmaps = _paired_maps(nets, sf, tf)
            gv = nets.guides.init(kg, smaps, tmaps, train=False)
            gv = {"params": gv.get("params", {}), "batch_stats": gv.get("batch_stats", {})}
        params = {"teacher": tv["params"], "student": sv["params"], "guide": gv["params"]}
        stats = {"teacher": tv["batch_stats"], "student": sv["batch_stats"], "guide": gv["batch_stats"]}
        return JointState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=stats,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(seed))


def _paired_maps(nets: Networks, student_feats, teacher_feats):
    s = student_feats[STAGE_SLICE]
    t = teacher_feats[STAGE_SLICE]
    return tuple(s[i] for i, _ in nets.pairs), tuple(t[j] for _, j in nets.pairs)


def _run(model, params, stats, x, train: bool):
    """Applies a zoo model; returns (logits, features, new_stats)."""
    if train:
        (logits, feats), upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return logits, feats, upd["batch_stats"]
    logits, feats = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return logits, feats, stats


def forward(nets: Networks, params, batch_stats, images, labels, key, train: bool):
    """Runs what the method needs; returns (Outputs, new batch_stats)."""
    m = nets.method
    xt, xs = nets.views(images, key, train)
    new_stats = dict(batch_stats)
    o = {"labels": labels}
    tfeats = sfeats = None
    if m.runs_teacher:
        # Frozen teachers run in inference mode: no BN update, no gradient.
        t_train = train and m.teacher_trainable
        tp = params["teacher"] if m.teacher_trainable else jax.lax.stop_gradient(params["teacher"])
        zt, tfeats, new_stats["teacher"] = _run(nets.teacher, tp, batch_stats["teacher"], xt, t_train)
        o["teacher_logits"] = zt
    if m.runs_student:
        zs, sfeats, new_stats["student"] = _run(nets.student, params["student"], batch_stats["student"], xs, train)
        o["student_logits"] = zs
    if nets.pairs and tfeats is not None and sfeats is not None:
        smaps, tmaps = _paired_maps(nets, sfeats, tfeats)
        o["student_stages"], o["teacher_stages"] = smaps, tmaps
        if nets.guides is not None:
            gvars = {"params": params["guide"], "batch_stats": batch_stats["guide"]}
            if train:
                o["guide"], upd = nets.guides.apply(gvars, smaps, tmaps, train=True, mutable=["batch_stats"])
                new_stats["guide"] = upd["batch_stats"]
            else:
                o["guide"] = nets.guides.apply(gvars, smaps, tmaps, train=False)
    return Outputs(**o), new_stats


def loss_terms(nets: Networks, params, batch_stats, batch, step):
    """The method's named loss terms on a training batch; returns (terms, (outputs, new_stats))."""
    key = jax.random.fold_in(jax.random.wrap_key_data(batch["rng"]), step)
    outputs, new_stats = forward(nets, params, batch_stats, batch["image"], batch["label"], key, train=True)
    progress = jnp.maximum(step - nets.student_start, 0).astype(jnp.float32) / max(nets.total_steps, 1)
    return nets.method.loss(outputs, nets.loss_cfg, progress), (outputs, new_stats)


def _head_start_step(nets: Networks, tx: optax.GradientTransformation, state: JointState, batch):
    """A step of the teacher head start: the teacher learns alone, from labels ('teacher' method's
    loss: no term that involves the waiting student); student and guided modules are not run and
    stay bitwise unchanged (params, BN statistics, SGD state). Metrics are the teacher's only
    (``loss``, ``teacher/*``): the waiting student has no loss or accuracy to report."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    xt, _ = nets.views(batch["image"], key, True)
    teacher_loss = get_method("teacher").loss

    def loss_fn(tp):
        zt, _, t_stats = _run(nets.teacher, tp, state.batch_stats["teacher"], xt, True)
        terms = teacher_loss(Outputs(labels=batch["label"], teacher_logits=zt), nets.loss_cfg, 0.0)
        return total_loss(terms), (terms, zt, t_stats)

    (loss, (terms, zt, t_stats)), g_t = jax.value_and_grad(loss_fn, has_aux=True)(state.params["teacher"])
    grads = {**jax.tree_util.tree_map(jnp.zeros_like, state.params), "teacher": g_t}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # Only the teacher's transform state moves (make_optimizer gives it its own label).
    inner = {k: (v if k == "teacher" else state.opt_state.inner_states[k]) for k, v in opt_state.inner_states.items()}
    opt_state = opt_state._replace(inner_states=inner)
    params = {**state.params, "teacher": optax.apply_updates(state.params["teacher"], updates["teacher"])}
    metrics = {"loss": loss, **terms, "teacher/train_top1": jnp.mean(losses.topk_correct(zt, batch["label"], 1))}
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats={**state.batch_stats, "teacher": t_stats},
        opt_state=opt_state,
    )
    return new_state, metrics


def _train_step(nets: Networks, tx: optax.GradientTransformation, state: JointState, batch):
    def loss_fn(params):
        terms, aux = loss_terms(nets, params, state.batch_stats, {**batch, "rng": state.rng}, state.step)
        return total_loss(terms), (terms, aux)

    (loss, (terms, (outputs, new_stats))), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # Frozen groups are carried over untouched (bitwise), not "updated by zero".
    params = {
        g: optax.apply_updates(state.params[g], updates[g]) if nets.trainable[g] else state.params[g]
        for g in state.params
    }
    metrics = {"loss": loss, **terms}
    if outputs.teacher_logits is not None:
        metrics["teacher/train_top1"] = jnp.mean(losses.topk_correct(outputs.teacher_logits, batch["label"], 1))
    if outputs.student_logits is not None:
        metrics["student/train_top1"] = jnp.mean(losses.topk_correct(outputs.student_logits, batch["label"], 1))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics


def _eval_step(nets: Networks, state: JointState, batch):
    """Sums over the (masked) batch: correct top-1/top-5 and CE for teacher and student."""
    outputs, _ = forward(nets, state.params, state.batch_stats, batch["image"], batch["label"], None, train=False)
    sums = evaluation.count_sum(batch["mask"])
    for who, logits in (("teacher", outputs.teacher_logits), ("student", outputs.student_logits)):
        if logits is not None:
            sums.update(evaluation.classification_sums(logits, batch["label"], batch["mask"], f"{who}/"))
    return sums


def _chunk(step_fn: Callable, mesh, state: JointState, feed: dict, n, resident: dict):
    """Up to K training steps in one program: ``step_fn`` applied to the first ``n`` (traced, so that one
    program serves every chunk length up to K) of the K batches ``feed`` holds. A feed is the batches
    themselves (``image`` (K, B, ...), ``label`` (K, B)), or, with the training set resident on the
    device (``resident``: its ``image`` and ``label`` arrays), their examples' indices (``index`` (K, B)).
    Returns the state after n steps and each step's metrics as (K,) arrays (entries from n on are 0)."""
    k = next(iter(feed.values())).shape[0]
    sharded = parallel.batch_sharded(mesh)
    if "index" in feed:  # all K batches gathered at once, before the loop (indices are in range: clip is a no-op)
        chunk = parallel.chunk_sharded(mesh)
        feed = {name: jax.lax.with_sharding_constraint(jnp.take(resident[name], feed["index"], axis=0, mode="clip"), chunk)
                for name in ("image", "label")}

    def batch_at(i):
        batch = {name: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for name, v in feed.items()}
        return jax.lax.with_sharding_constraint(batch, sharded)

    shapes = jax.eval_shape(lambda s, i: step_fn(s, batch_at(i))[1], state, 0)
    buffers = {name: jnp.zeros((k, *a.shape), a.dtype) for name, a in shapes.items()}

    def body(i, carry):
        state, buffers = carry
        state, metrics = step_fn(state, batch_at(i))
        return state, {name: buffers[name].at[i].set(metrics[name]) for name in buffers}

    return jax.lax.fori_loop(0, n, body, (state, buffers))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled programs of a run.

    ``train_chunk(state, feed, first_step, n, resident)`` runs the training steps ``first_step`` ..
    ``first_step + n - 1`` in one call (:func:`_chunk`; n at most the feed's K). The caller's step number (on
    the host, so no device round trip) picks the teacher-only head-start program before
    ``nets.student_start`` and the joint program after it -- two separately compiled programs (a
    ``lax.cond`` between them made XLA:CPU about 30x slower); a chunk never spans the switch (it falls on an
    epoch boundary, and chunks stay inside epochs). Each program is the same for every n, so the steps'
    results do not depend on how they are grouped into calls: K steps per call give bitwise the results of
    one per call. ``train(state, batch, step_index)`` is one step (a chunk of one, through the same program).
    ``eval(state, batch)`` returns masked sums (``_eval_step``).
    """

    train_chunk: Callable
    train: Callable
    eval: Callable
    precompile: Callable  # precompile(state, feed, resident, eval_batch_size, image_shape): all compiled now
    programs: dict  # 'joint', 'head' (with a head start), 'eval': the jitted (or compiled) programs


def compile_steps(nets: Networks, tx: optax.GradientTransformation, mesh) -> Steps:
    """The jitted training programs (state donated) and eval step over ``mesh``: batches sharded along the
    mesh, state replicated. Programs compile when first called, or all at once with ``precompile`` (so that,
    e.g., an out-of-memory of the joint program after a head start shows up before training).

    On the CPU the steps' convolutions are put in the layout XLA:CPU runs fast inside loops
    (:mod:`ekd_jax.cpu_convs`); the values are the same."""
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    chunk_sharded = parallel.chunk_sharded(mesh)
    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def program(step_fn):
        step_fn = canonical_convs(step_fn) if on_cpu else step_fn
        return jax.jit(functools.partial(_chunk, step_fn, mesh), in_shardings=(rep, chunk_sharded, rep, rep),
                       out_shardings=(rep, rep), donate_argnums=0)

    programs = {"joint": program(functools.partial(_train_step, nets, tx))}
    if nets.student_start > 0:
        programs["head"] = program(functools.partial(_head_start_step, nets, tx))
    programs["eval"] = jax.jit(lambda state, batch: _eval_step(nets, state, batch), in_shardings=(rep, bat), out_shardings=rep)

    def train_chunk(state, feed, first_step: int, n: int, resident=None):
        name = "head" if first_step < nets.student_start else "joint"
        return programs[name](state, feed, np.int32(n), resident or {})

    def train(state, batch, step_index: int):
        feed = jax.tree_util.tree_map(lambda x: jax.lax.expand_dims(x, (0,)), batch)
        state, metrics = train_chunk(state, jax.device_put(feed, chunk_sharded), step_index, 1)
        return state, {name: m[0] for name, m in metrics.items()}

    def evaluate(state, batch):
        return programs["eval"](state, batch)

    def precompile(state, feed, resident, eval_batch_size: int, image_shape) -> None:
        """``feed`` and ``resident``: arrays, or their ``jax.ShapeDtypeStruct``s."""
        n = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        for name in [p for p in programs if p != "eval"]:
            programs[name] = programs[name].lower(state, feed, n, resident or {}).compile()
        batch = {"image": jax.ShapeDtypeStruct((eval_batch_size, *image_shape), jnp.uint8, sharding=bat),
                 "label": jax.ShapeDtypeStruct((eval_batch_size,), jnp.int32, sharding=bat),
                 "mask": jax.ShapeDtypeStruct((eval_batch_size,), jnp.float32, sharding=bat)}
        programs["eval"] = programs["eval"].lower(state, batch).compile()

    return Steps(train_chunk, train, evaluate, precompile, programs)
