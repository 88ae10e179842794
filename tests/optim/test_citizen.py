"""A sharpness-aware optimizer is a full torch.optim citizen (issue 14, issue 12.2).

Warm starts from and to plain torch optimizers, param groups, copies (deepcopy, pickle,
torch.save), torch's step hooks, repr, refused base optimizers, the random state shared by
the passes of one step (dropout masks), and clear errors for misuse (a closure without
``backward()``, a closure returning ``None``, ``second_step()`` without ``first_step()``).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import samkit
from optim_helpers import batches, loss_fn, mean_loss, plain_closure, tiny_net

METHODS = samkit.optim.list_optimizers(sharpness_aware=True)
# methods that accept a hand-written closure (the others refuse one with a clear TypeError)
PLAIN_CLOSURE = [m for m in METHODS if not samkit.get_optimizer_info(m).needs_batch_closure]


def make(name, model, **kw):
    kw.setdefault("lr", 0.05)
    opt = samkit.create_optimizer(name, model.parameters(), model=model, **kw)
    opt.set_epoch(0)  # methods acting on epochs need it; the others ignore it
    return opt


def train(opt, model, data):
    for i, (x, y) in enumerate(data):
        idx = torch.arange(i * len(y), (i + 1) * len(y))
        opt.step(samkit.make_closure(model, loss_fn, x, y, indices=idx))


def plain_train(opt, model, data):
    """A plain torch optimizer on the same closure (the same gradients, bit for bit)."""
    for x, y in data:
        opt.zero_grad()
        samkit.make_closure(model, loss_fn, x, y)()
        opt.step()


def saved(sd):
    """A state dict as after torch.save/torch.load (a live one shares its tensors)."""
    return copy.deepcopy(sd)


def same_params(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def same_state(s1, s2):
    """Two optimizers' ``state`` (tensors per parameter) are identical, in parameter order."""
    assert len(s1) == len(s2)
    for a, b in zip(s1.values(), s2.values()):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


# ----------------------------------------------------------------------------- warm starts
def test_warm_start_from_a_plain_adamw_state_loads_its_moments():
    data = batches(6)
    m1 = tiny_net()
    adamw = torch.optim.AdamW(m1.parameters(), lr=1e-2, weight_decay=0.05)
    plain_train(adamw, m1, data[:3])
    m2 = copy.deepcopy(m1)
    # rho = 0 is AdamW bit for bit, so the continuation shows the moments were loaded
    opt = samkit.SAM(m2.parameters(), "adamw", rho=0.0, lr=0.5, weight_decay=0.0)
    opt.load_state_dict(saved(adamw.state_dict()))
    assert opt.param_groups is opt.base_optimizer.param_groups
    group = opt.param_groups[0]
    assert group["rho"] == 0.0 and group["lr"] == 1e-2 and group["weight_decay"] == 0.05
    same_state(opt.base_optimizer.state, adamw.state)
    plain_train(adamw, m1, data[3:])
    train(opt, m2, data[3:])
    assert same_params(m1, m2)


def test_warm_start_keeps_the_method_hyperparameters():
    model = tiny_net()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain_train(adamw, model, batches(1))
    opt = samkit.FriendlySAM(model.parameters(), "adamw", rho=0.07, sigma=0.5, lr=1.0)
    opt.load_state_dict(adamw.state_dict())
    assert {k: opt.param_groups[0][k] for k in ("rho", "sigma", "lmbda", "lr")} == {
        "rho": 0.07,
        "sigma": 0.5,
        "lmbda": 0.6,
        "lr": 1e-2,
    }


def test_loading_into_the_base_optimizer_keeps_the_scheduler_acting():
    data = batches(4)
    m1 = tiny_net()
    adamw = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    plain_train(adamw, m1, data[:2])
    m2 = copy.deepcopy(m1)
    opt = samkit.SAM(m2.parameters(), "adamw", rho=0.0, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    groups = opt.param_groups
    opt.base_optimizer.load_state_dict(saved(adamw.state_dict()))
    assert opt.param_groups is groups and opt.base_optimizer.param_groups is groups
    assert groups[0]["rho"] == 0.0  # the method's keys survive the plain state
    ref_sched = torch.optim.lr_scheduler.StepLR(adamw, step_size=1, gamma=0.1)
    for x, y in data[2:]:
        opt.step(samkit.make_closure(m2, loss_fn, x, y))
        plain_train(adamw, m1, [(x, y)])
        sched.step()
        ref_sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert same_params(m1, m2)  # the AdamW inside stepped with the scheduled lr


def test_the_method_hyperparameters_come_from_the_samkit_state():
    # A samkit state whose base part carries no method keys (built from base_state_dict):
    # the method's values come from the state's own param groups.
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), "adamw", rho=0.2, lr=1e-2)
    train(opt, model, batches(1))
    sd = saved(opt.state_dict())
    sd["base_optimizer"] = saved(opt.base_state_dict())
    opt2 = samkit.SAM(copy.deepcopy(model).parameters(), "adamw", rho=0.9, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["rho"] == 0.2 and opt2.param_groups[0]["lr"] == 1e-2


def test_samkit_state_load_keeps_the_groups_shared_and_the_same_objects():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), "adamw", lr=1e-2)
    train(opt, model, batches(2))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = samkit.SAM(model2.parameters(), "adamw", lr=1.0, rho=0.5)
    groups = opt2.param_groups
    opt2.load_state_dict(sd)
    assert opt2.param_groups is groups and opt2.base_optimizer.param_groups is groups
    assert groups[0]["lr"] == 1e-2 and groups[0]["rho"] == 0.05
    train(opt, model, batches(2, seed=4))
    train(opt2, model2, batches(2, seed=4))
    assert same_params(model, model2)


def test_base_state_dict_warm_starts_a_plain_optimizer():
    data = batches(5)
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), "adamw", rho=0.0, lr=1e-2)
    train(opt, model, data[:3])
    exported = opt.base_state_dict()
    assert not {"rho", "adaptive", "eta", "weight_scaling"} & set(exported["param_groups"][0])
    model2 = copy.deepcopy(model)
    adamw = torch.optim.AdamW(model2.parameters(), lr=0.5)
    adamw.load_state_dict(saved(exported))
    same_state(adamw.state, opt.base_optimizer.state)
    assert adamw.param_groups[0]["lr"] == 1e-2 and "rho" not in adamw.param_groups[0]
    assert "rho" in opt.param_groups[0]  # the live groups keep them
    train(opt, model, data[3:])
    plain_train(adamw, model2, data[3:])
    assert same_params(model, model2)


def _refused(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    same_state(opt.base_optimizer.state, {})  # still empty: nothing was loaded
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_mismatched_states_are_refused_before_anything_changes():
    model = tiny_net()
    params = list(model.parameters())
    opt = samkit.SAM(params, "adamw", lr=1e-2)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    plain_train(sgd, model, batches(1))
    _refused(opt, sgd.state_dict(), r"another optimizer class.*\['betas', 'eps', 'amsgrad'\]")
    adam = torch.optim.Adam(params, lr=1e-2)
    _refused(opt, adam.state_dict(), "decoupled_weight_decay")
    two = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    _refused(opt, two.state_dict(), r"has 2 param group\(s\), this optimizer has 1")
    fewer = torch.optim.AdamW(params[:3])
    _refused(opt, fewer.state_dict(), r"param group 0 .* has 3 parameter\(s\).* has 4")
    fsam = samkit.FriendlySAM(tiny_net().parameters(), "adamw", lr=1e-2)
    sam_state = samkit.SAM(tiny_net().parameters(), "adamw", lr=1e-2).state_dict()
    with pytest.raises(ValueError, match=r"\['lmbda', 'sigma'\]: it was saved by another"):
        fsam.load_state_dict(sam_state)
    with pytest.raises(ValueError, match="neither a samkit"):
        opt.load_state_dict({"model": {}})
    with pytest.raises(ValueError, match=r"samkit optimizer's state; load it with opt"):
        opt.base_optimizer.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="another optimizer class"):
        opt.base_optimizer.load_state_dict(sgd.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups


# ----------------------------------------------------------------------------- param groups
def test_a_rejected_param_group_is_not_kept():
    model = tiny_net()
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid rho value: -0.1"):
        opt.add_param_group({"params": [extra], "rho": -0.1})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="Invalid rho_min value"):
        samkit.BilateralSAM(model.parameters(), lr=0.1).add_param_group(
            {"params": [extra], "rho_min": -1.0}
        )
    opt.add_param_group({"params": (p for p in [extra]), "rho": 0.1})  # the corrected retry
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == [extra]
    assert opt.param_groups[1]["rho"] == 0.1 and opt.param_groups[1]["momentum"] == 0.9
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's check
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2


# ----------------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", METHODS)
def test_a_copy_is_a_working_identical_optimizer(name, how):
    data = batches(4, size=12)
    model = tiny_net(bn=True)
    opt = make(name, model, base="adamw", lr=1e-2)
    train(opt, model, data[:2])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert type(opt2) is type(opt) and opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    same_state(opt2.base_optimizer.state, opt.base_optimizer.state)  # AdamW's moments
    same_state(opt2.state, opt.state)
    assert opt2.samkit_state.keys() == opt.samkit_state.keys()
    for k, v in opt.samkit_state.items():  # counters, and tensors such as a generator's state
        w = opt2.samkit_state[k]
        assert torch.equal(v, w) if torch.is_tensor(v) else v == w, k
    train(opt, model, data[2:])
    train(opt2, model2, data[2:])
    assert same_params(model, model2)
    for a, b in zip(model.buffers(), model2.buffers()):
        assert torch.equal(a, b)
    # the copy's base optimizer stays linked to its groups on a warm start
    opt2.base_optimizer.load_state_dict(opt2.base_state_dict())
    assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_copying_in_the_middle_of_a_step_is_refused_clearly():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    mean_loss(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"middle of a step.*state_dict\(\)"):
        copy.deepcopy(opt)


def test_a_copy_does_not_carry_a_scheduler_patch_of_the_original():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step on the instance
    opt2 = copy.deepcopy(opt)
    assert "step" not in vars(opt2)


# ----------------------------------------------------------------------------- hooks, repr
def test_torch_step_hooks_fire_once_per_step():
    model = tiny_net(dtype=torch.float32)
    opt = samkit.SAM(model.parameters(), "adamw", lr=1e-2)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global-pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global-post", o))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("opt-post", o))),
        opt.base_optimizer.register_step_post_hook(lambda o, a, k: seen.append(("base-post", o))),
    ]
    try:
        x, y = batches(1, dtype=torch.float32)[0]
        opt.step(samkit.make_closure(model, loss_fn, x, y))
        assert seen == [
            ("global-pre", opt),
            ("base-post", opt.base_optimizer),
            ("opt-post", opt),
            ("global-post", opt),
        ]
        seen.clear()  # the GradScaler's path as well
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        opt.step(samkit.make_closure(model, loss_fn, x, y, grad_scaler=scaler))
        assert [s for s, _ in seen] == ["global-pre", "base-post", "opt-post", "global-post"]
    finally:
        for h in handles:
            h.remove()
    # the handles still remove the global hooks (the registries are the same objects)
    from torch.optim import optimizer as torch_optimizer

    assert not torch_optimizer._global_optimizer_post_hooks
    assert not torch_optimizer._global_optimizer_pre_hooks


def test_repr_shows_the_base_optimizer_and_every_group():
    model = tiny_net()
    w1, b1, w2, b2 = model.parameters()
    opt = samkit.SAM([{"params": [w1, b1], "rho": 0.1}, {"params": [w2, b2]}], "adamw", lr=1e-3)
    text = repr(opt)
    assert text.startswith("SAM (\nbase_optimizer: AdamW\nParameter Group 0\n")
    assert "Parameter Group 1" in text and "    rho: 0.1\n" in text and "    rho: 0.05\n" in text
    assert "    lr: 0.001\n" in text and "    betas: (0.9, 0.999)\n" in text


@pytest.mark.parametrize("base", [torch.optim.LBFGS, "lbfgs_class"])
def test_base_optimizers_whose_step_needs_a_closure_are_refused(base):
    class NeedsClosure(torch.optim.SGD):
        def step(self, closure):
            return super().step(closure)

    base = NeedsClosure if base == "lbfgs_class" else base
    with pytest.raises(ValueError, match=r"is not supported: its step\(\) requires a closure"):
        samkit.SAM(tiny_net().parameters(), base, lr=0.1)
    with pytest.raises(ValueError, match="requires a closure"):
        samkit.create_optimizer("fsam", tiny_net().parameters(), base=base, lr=0.1)


# ----------------------------------------------------------------------------- random state
class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 3)
        self.double()

    def forward(self, x):
        return self.head(self.body(x))


def record_masks(model):
    masks = []
    model.body[2].register_forward_hook(lambda m, i, o: masks.append(o.detach() != 0))
    return masks


@pytest.mark.parametrize("kind", ["standard", "batch", "accumulation"])
def test_every_pass_of_a_step_sees_the_same_dropout_masks(kind):
    model = DropNet()
    masks = record_masks(model)
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, model=model)
    x, y = batches(1, size=8)[0]
    for _ in range(2):
        masks.clear()
        if kind == "standard":
            opt.step(plain_closure(opt, model, x, y))
        else:
            acc = 2 if kind == "accumulation" else 1
            opt.step(samkit.make_closure(model, loss_fn, x, y, accumulation_steps=acc))
        n = len(masks) // 2  # micro-batches per pass
        assert len(masks) == 2 * n and n == (2 if kind == "accumulation" else 1)
        assert all(torch.equal(a, b) for a, b in zip(masks[:n], masks[n:]))
        assert masks[0].any() and not masks[0].all()  # a real mask
    # and the masks change from one step to the next
    first = masks[0]
    masks.clear()
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert not torch.equal(masks[0], first)


def test_share_rng_false_draws_fresh_masks():
    model = DropNet()
    masks = record_masks(model)
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, share_rng=False)
    x, y = batches(1, size=8)[0]
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("name", METHODS)
def test_every_method_starts_every_pass_from_one_random_state(name):
    # A pass over samples of an earlier pass (the same batch, a subset of it) replays that
    # pass's random state; passes over other samples (mSAM's micro-batches) draw their own.
    model = DropNet()
    starts = []

    def record(module, inputs):
        x = inputs[0]
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(x)  # SSAM-F's Fisher pass
        rows = None if wrapped else {tuple(r.tolist()) for r in x}  # None: the whole batch
        starts.append((rows, torch.get_rng_state()))

    model.register_forward_pre_hook(record)
    opt = make(name, model, momentum=0.9)
    data = batches(3, size=8)
    for i, (x, y) in enumerate(data):
        starts.clear()
        before = torch.get_rng_state()
        opt.step(samkit.make_closure(model, loss_fn, x, y, indices=torch.arange(8) + 8 * i))
        assert starts and torch.equal(starts[0][1], before), name
        for k, (rows, state) in enumerate(starts):
            first = next(s for r, s in starts[: k + 1] if rows is None or r is None or rows <= r)
            assert torch.equal(state, first), name


def test_after_a_step_the_generator_stands_where_one_pass_leaves_it():
    model, ref = DropNet(), DropNet()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    x, y = batches(1, size=8)[0]
    start = torch.get_rng_state()
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    after_step = torch.get_rng_state()
    torch.set_rng_state(start)
    mean_loss(ref, x, y).backward()  # one plain forward/backward pass
    assert torch.equal(after_step, torch.get_rng_state())
    # also when a later pass fails: the stream goes on as after the first pass
    torch.set_rng_state(start)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            torch.rand(100)  # draws, then fails
            raise KeyboardInterrupt
        return plain_closure(opt, model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert torch.equal(torch.get_rng_state(), after_step)


def test_manual_steps_leave_the_random_state_alone():
    model = DropNet()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    x, y = batches(1, size=8)[0]
    mean_loss(model, x, y).backward()
    state = torch.get_rng_state()
    opt.first_step(zero_grad=True)
    assert torch.equal(torch.get_rng_state(), state)
    mean_loss(model, x, y).backward()
    state = torch.get_rng_state()
    opt.second_step(zero_grad=True)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("name", PLAIN_CLOSURE)
def test_a_closure_without_backward_is_a_clear_error(name):
    model = tiny_net()
    opt = make(name, model, momentum=0.9)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]

    def forgetful():
        opt.zero_grad()
        return mean_loss(model, x, y)

    with pytest.raises(RuntimeError, match=r"no parameter with a gradient.*loss\.backward\(\)"):
        opt.step(forgetful)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.samkit_state["step"] == 0 and not opt.is_perturbed


@pytest.mark.parametrize("name", PLAIN_CLOSURE)
def test_a_closure_returning_none_is_a_clear_error(name):
    model = tiny_net()
    opt = make(name, model, momentum=0.9)
    x, y = batches(1)[0]

    def silent():
        opt.zero_grad()
        mean_loss(model, x, y).backward()

    with pytest.raises(TypeError, match=r"closure returned None in the clean pass.*return"):
        opt.step(silent)
    assert opt.samkit_state["step"] == 0


def test_a_stale_gradient_on_a_frozen_parameter_does_not_hide_a_missing_backward():
    model = tiny_net()
    x, y = batches(1)[0]
    mean_loss(model, x, y).backward()
    model[0].weight.requires_grad_(False)  # frozen, but keeps its old .grad
    opt = samkit.SAM(model.parameters(), lr=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = None  # the trainable ones have none: the backward pass is missing
    with pytest.raises(RuntimeError, match=r"first_step\(\) found no gradient"):
        opt.first_step()


def test_manual_misuse_is_a_clear_error():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without first_step\(\)"):
        opt.second_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) found no gradient.*backward"):
        opt.first_step()
    mean_loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"step\(\) called between first_step"):
        opt.step(plain_closure(opt, model, x, y))
    with pytest.raises(RuntimeError, match=r"second_step\(\) found no gradient.*backward"):
        opt.second_step()  # the backward pass at the perturbed weights was forgotten
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.samkit_state["step"] == 0 and not opt.is_perturbed
    mean_loss(model, x, y).backward()  # restore() abandons a step begun by hand
    opt.first_step(zero_grad=True)
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_methods_with_their_own_passes_refuse_manual_steps():
    model = tiny_net()
    opt = samkit.BilateralSAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    mean_loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"BilateralSAM has its own sequence.*step\(closure\)"):
        opt.first_step()
    assert not opt.is_perturbed


@pytest.mark.parametrize(
    "cls,kw,message",
    [
        (samkit.SAM, {"rho": "0.1"}, "Invalid rho value: '0.1' (must be a finite number >= 0, got str)"),
        (samkit.SAM, {"eta": None}, "Invalid eta value: None (must be a finite number >= 0, got NoneType)"),
        (samkit.FriendlySAM, {"lmbda": "0.5"}, "Invalid lmbda value: '0.5' (must be a number in [0, 1), got str)"),
        (samkit.FriendlySAM, {"sigma": float("inf")}, "Invalid sigma value: inf (must be a finite number >= 0)"),
        (samkit.BilateralSAM, {"rho_min": "1"}, "Invalid rho_min value: '1' (must be a finite number >= 0, got str)"),
        (samkit.SAM, {"perturb_eps": "1e-12"}, "Invalid perturb_eps value: '1e-12'"),
    ],
)  # fmt: skip
def test_invalid_values_are_shown_with_their_repr_and_what_is_expected(cls, kw, message):
    with pytest.raises(ValueError) as err:
        cls(tiny_net().parameters(), lr=0.1, **kw)
    assert message in str(err.value)


def test_a_pass_on_a_subset_starts_from_the_same_random_state():
    class SubsetSAM(samkit.SAM):  # the shape of ESAM's data selection: a sub-batch pass
        def sharpness_step(self, closure):
            loss = self.run_pass(closure, "clean")
            self.perturb()
            self.run_pass(closure, "select", perturbed=True, backward=False, per_sample=True)
            self.run_pass(closure, "perturbed", perturbed=True, subset=torch.tensor([0, 2, 5]))
            self.restore()
            self.base_step()
            return loss

    model = DropNet()
    starts, masks = [], record_masks(model)
    model.register_forward_pre_hook(lambda m, i: starts.append(torch.get_rng_state()))
    opt = SubsetSAM(model.parameters(), rho=0.5, lr=0.1)
    x, y = batches(1, size=8)[0]
    before = torch.get_rng_state()
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert len(starts) == 3 and all(torch.equal(s, before) for s in starts)
    assert torch.equal(masks[0], masks[1]) and masks[2].shape == (3, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_passes_share_the_cuda_generator_too():
    model = DropNet().cuda()
    masks = record_masks(model)
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    x, y = (t.cuda() for t in batches(1, size=8)[0])
    start = torch.cuda.get_rng_state()
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    after = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(start)
    mean_loss(model, x, y).backward()  # one plain pass draws as much as the whole step
    assert torch.equal(torch.cuda.get_rng_state(), after)
    masks.clear()
    fresh = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, share_rng=False)
    fresh.step(samkit.make_closure(model, loss_fn, x, y))
    assert not torch.equal(masks[0], masks[1])
