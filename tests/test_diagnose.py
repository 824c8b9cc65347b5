"""The convergence doctor: spectrum estimates, the forum case end to end, the CLI, fallback."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

import mdeq
from mdeq import DEQ, FallbackChain, Tempered, get_solver
from mdeq.cli import main
from mdeq.core.jacobian import jacobian_eigenvalues, spectral_summary


def test_spectral_estimates_match_exact_eigenvalues_of_a_linear_map():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    exact = torch.linalg.eigvals(a)
    rho, right = spectral_summary(lambda z: z @ a.T + 1.0, torch.randn(3, 6, dtype=torch.float64), k=20)
    torch.testing.assert_close(rho, torch.full((3,), float(exact.abs().max()), dtype=torch.float64))
    torch.testing.assert_close(right, torch.full((3,), float(exact.real.max()), dtype=torch.float64))
    ritz = jacobian_eigenvalues(lambda z: z @ a.T, torch.randn(1, 6, dtype=torch.float64), k=6)[0]
    assert torch.allclose(torch.sort(ritz.abs()).values, torch.sort(exact.abs()).values)


def test_spectral_radius_of_a_large_map_from_few_krylov_steps():
    torch.manual_seed(1)
    w = torch.randn(200, 200, dtype=torch.float64) / 200**0.5 * 0.8
    exact = float(torch.linalg.eigvals(w).abs().max())
    rho, _ = spectral_summary(lambda z: torch.tanh(z @ w.T) * 0 + z @ w.T, torch.zeros(2, 200, dtype=torch.float64), k=40)
    assert abs(float(rho.max()) - exact) / exact < 0.05


class ForumCell(nn.Module):
    """f(z, x) = Dense(2,1)(Dense(1,2)(z + x)) with Flux's default Glorot-uniform init."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(1, 2), nn.Linear(2, 1)
        nn.init.xavier_uniform_(self.inner.weight)
        nn.init.xavier_uniform_(self.outer.weight)

    def forward(self, z, x):
        return self.outer(self.inner(z + x))


def test_the_forum_case_diagnosed_fixed_and_trained():
    torch.manual_seed(8)  # a seed where the map's gain is 1.73: plain iteration diverges
    deq = DEQ(ForumCell(), solver="fixed_point", tol=1e-6, max_steps=100, on_divergence="ignore").double()
    x = torch.arange(1.0, 11.0, dtype=torch.float64)[:, None]
    diag = mdeq.diagnose(deq, x)
    assert not diag.converged
    assert diag.spectral_radius >= 1.0 and not diag.iteration_stable
    top = diag.recommendations[0]
    assert "Temper" in top.title and top.apply is not None
    text = diag.table()
    assert "NOT locally stable" in text and "Temper f" in text
    top.apply(deq)
    assert isinstance(deq.f, Tempered)
    _, sol = deq(x)
    assert sol.all_converged
    # ... and the tempered model trains: y = 2x, then predicts about -10 at x = -5
    deq.on_divergence = "raise"
    opt = torch.optim.Adam(deq.parameters(), lr=0.02)
    for _ in range(1000):
        z, _ = deq(x)
        loss = (z - 2 * x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred, sol = deq(torch.tensor([[-5.0]], dtype=torch.float64))
    assert sol.all_converged and abs(float(pred) + 10.0) < 0.1, float(pred)
    assert mdeq.diagnose(deq, x).iteration_stable


def test_flow_stable_map_gets_the_ode_recommendation_with_evidence():
    deq = DEQ(lambda z, x: -1.5 * z + x, solver="fixed_point", tol=1e-6, max_steps=60, on_divergence="ignore")
    diag = mdeq.diagnose(deq, torch.randn(4, 3, dtype=torch.float64))
    assert abs(diag.spectral_radius - 1.5) < 1e-6 and abs(diag.rightmost_real + 1.5) < 1e-6
    assert diag.flow_stable and not diag.iteration_stable
    titles = [r.title for r in diag.recommendations]
    assert any("solver='ode'" in t for t in titles) and any("damping" in t for t in titles)
    ode = next(t for t in diag.trials if t.solver == "ode")
    assert ode.converged_fraction == 1.0
    damp = next(r for r in diag.recommendations if "damping" in r.title)
    damp.apply(deq)
    _, sol = deq(torch.randn(4, 3, dtype=torch.float64))
    assert sol.all_converged


def test_budget_too_small_recommends_more_steps():
    from mdeq import TanhCell

    torch.manual_seed(0)
    deq = DEQ(TanhCell(8, 3, weight_scale=1.5), solver="fixed_point", tol=1e-8, max_steps=12, state_shape=(8,), on_divergence="ignore").double()
    x = torch.randn(4, 3, dtype=torch.float64)
    diag = mdeq.diagnose(deq, x)
    assert diag.iteration_stable and not diag.converged  # contractive (rho ~0.76), budget too small
    rec = next(r for r in diag.recommendations if "max_steps" in r.title)
    rec.apply(deq)
    assert deq.max_steps > 12
    _, sol = deq(x)
    assert sol.all_converged


def test_diagnose_finds_the_layer_inside_a_model_and_reports_json():
    from mdeq.models import mdeq_digits

    model = mdeq_digits().train()
    diag = mdeq.diagnose(model, torch.randn(4, 1, 8, 8))
    d = json.loads(diag.to_json())
    assert d["layer"] == "deq" and d["batch_size"] == 4 and len(d["trials"]) >= 4
    assert {"spectral_radius", "rightmost_real", "iteration_stable", "flow_stable", "recommendations"} <= set(d)
    with pytest.raises(ValueError, match="no DEQ layer named 'dq'"):
        mdeq.diagnose(model, torch.randn(2, 1, 8, 8), layer="dq")
    with pytest.raises(ValueError, match="contains no DEQ layer"):
        mdeq.diagnose(nn.Linear(2, 2), torch.randn(2, 2))


def test_doctor_cli_by_model_and_by_config(capsys, tmp_path):
    fig = tmp_path / "doc.png"
    assert main(["doctor", "--model", "conv_deq_small", "--batch-size", "2", "--json", "--figure", str(fig)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["converged"] and fig.stat().st_size > 10_000
    from tests.lightning.conftest import REPO

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["doctor", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--batch-size", "4", "--figure", ""]) == 0
    assert not [str(w.message) for w in caught if "args parameter" in str(w.message)]  # Lightning's args-and-argv notice
    out = capsys.readouterr().out
    assert "Jacobian at z*" in out and "anderson" in out


def test_fallback_chain_hands_failures_to_the_next_solver():
    x = torch.randn(5, 3, dtype=torch.float64)
    res = FallbackChain(solvers=("fixed_point", "ode")).solve(lambda z: -1.5 * z + x, torch.zeros_like(x), tol=1e-8, max_steps=80)
    assert res.converged.all()
    torch.testing.assert_close(res.z, x / 2.5, rtol=1e-6, atol=1e-7)
    chain = get_solver({"name": "fallback", "solvers": ["anderson", "broyden"]})
    assert [s.name for s in chain.solvers] == ["anderson", "broyden"]
    with pytest.raises(ValueError, match="unknown solver"):
        FallbackChain(solvers=("andersen",))
    with pytest.raises(TypeError, match=r"takes a sequence of solvers.*got 'anderson'"):
        FallbackChain(solvers="anderson")  # said "unknown solver 'a'" (it iterated the string)
    deq = DEQ(lambda z, x: -1.5 * z + x, solver=FallbackChain(solvers=("fixed_point", "ode")), tol=1e-8, max_steps=80, on_divergence="raise")
    z, sol = deq(x)
    assert sol.all_converged and sol.solver == "fallback"


def test_diagnosis_figure_goes_to_a_logger_or_a_file(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from mdeq.models import mdeq_digits

    diag = mdeq.diagnose(mdeq_digits().train(), torch.randn(2, 1, 8, 8))
    assert diag.log_figure(CSVLogger(str(tmp_path)), fallback_path=str(tmp_path / "d.png")) == str(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 10_000


HEAVY_ARCHITECTURES = ("mdeq_imagenet_small", "mdeq_large")
"""Registered architectures whose doctor run takes minutes on a CPU (224x224 inputs, ~10M parameters)."""


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_ARCHITECTURES else n for n in __import__("zoo").list_models()],
)
def test_doctor_runs_for_every_registered_model(name, capsys):
    """The input shape comes from the model's task (no guessing): every zoo name works."""
    import zoo

    assert main(["doctor", "--model", name, "--batch-size", "2", "--json", "--figure", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch_size"] == 2 and report["recommendations"] is not None
    assert zoo.entry(name).input_shape == zoo.entry(name).task_info.input_shape


def test_doctor_figure_plots_residual_against_f_evaluations_with_the_tol_line():
    """The x axis is the cost: each solver's line ends at its f-evaluation count (Newton-Krylov
    spends several per iteration), and the tolerance is drawn."""
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    from mdeq import TanhCell

    deq = DEQ(TanhCell(6, weight_scale=0.5), tol=1e-5, max_steps=40)
    diag = mdeq.diagnose(deq, torch.randn(8, 6), trials=("fixed_point", "newton_krylov"))
    fig = diag.figure()
    ax = fig.axes[0]
    assert ax.get_xlabel() == "f-evaluations"
    ends = {line.get_label().split(" ")[0]: float(line.get_xdata()[-1]) for line in ax.get_lines() if "(median)" in line.get_label()}
    for t in diag.trials:
        assert ends[t.solver] == pytest.approx(t.nfe), t.solver
    assert any(line.get_label() == "tol 1e-05" for line in ax.get_lines())
    plt.close(fig)


USER_MODELS = '''
import torch
from torch import nn
from mdeq import DEQ, TanhCell


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.deq = DEQ(TanhCell(8, weight_scale=2.5), max_steps=30)

    def forward(self, x):
        return self.deq(self.stem(x))[0]


def build():
    return Net()


def build_with_batch():
    return Net(), torch.randn(6, 4)


model = Net()
'''


def test_doctor_takes_a_users_own_model_by_module_and_factory(capsys, tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["doctor", "--module", "usermodels:build", "--input-shape", "4", "--figure", "", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == "deq" and report["batch_size"] == 8
    assert main(["doctor", "--module", "usermodels.py:build_with_batch", "--figure", "", "--json"]) == 0  # a file path, its own batch
    assert json.loads(capsys.readouterr().out)["batch_size"] == 6
    assert main(["doctor", "--module", "usermodels:model", "--input-shape", "4", "--figure", ""]) == 0  # a model object
    assert "Recommendations" in capsys.readouterr().out
    for spec, extra, message in (
        ("usermodels:nope", ["--input-shape", "4"], "usermodels has no 'nope' \\(it defines: .*build"),
        ("usermodels:build", [], "returned a model without a batch: give --input-shape"),
        ("no_such_module:build", [], "No module named 'no_such_module'"),
        ("usermodels", [], "expected PKG.MOD:FACTORY"),
        ("usermodels:torch", [], "neither a model nor a function"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["doctor", "--module", spec, *extra, "--figure", ""])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), spec
