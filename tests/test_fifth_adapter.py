"""A fifth adapter type defined only in this file — the equivalent of one tuner folder (config, layer, model, registry
entry) — passes the whole contract table, and scripts/bench.py and scripts/inspect_adapter.py pick it up without
edits. This is what "adding an adapter is one folder plus its tests" means."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import get_peft_model
from torch import nn

from hadapeft import registry
from hadapeft.core.config import HadaConfig, document_fields, help_field
from hadapeft.core.layer import HadaLayer, Modulation
from hadapeft.core.model import HadaModel
from hadapeft.core.targets import ATTENTION
from conftest import FAMILIES, build_model, make_inputs
from test_contract import CHECKS


# --- the adapter: config.py, layer.py, model.py, __init__.py of a tuner folder -------------------------------------
@document_fields
@dataclass
class ShiftScaleConfig(HadaConfig):
    """``y = o ∘ h + β``: a learned output scale and shift (o = 1, β = 0 at init)."""

    scale: bool = help_field(True, "Learn the output scale o too (else only the shift β).")


class ShiftScaleLinear(HadaLayer):
    adapter_layer_names = ("shift_scale_o", "shift_scale_b")

    def init_adapter_containers(self):
        self.shift_scale_o = nn.ParameterDict()  # (1, d_out)
        self.shift_scale_b = nn.ParameterDict()  # (1, d_out)

    def create_adapter(self, name, config, **kwargs):
        d = self.out_features
        o, b = (torch.ones(1, d), torch.zeros(1, d)) if config.init_weights else \
            (1 + 0.3 * torch.randn(1, d), 0.3 * torch.randn(1, d))
        self.shift_scale_o[name] = nn.Parameter(o, requires_grad=config.scale)
        self.shift_scale_b[name] = nn.Parameter(b)

    def modulation(self, name):
        return Modulation(scales=((None, self.shift_scale_o[name]),), shift=self.shift_scale_b[name])


class ShiftScaleModel(HadaModel):
    prefix = "shift_scale_"
    tuner_layer_cls = ShiftScaleLinear
    target_module_mapping = ATTENTION


ADAPTER = registry.AdapterType(
    name="SHIFT_SCALE", config_cls=ShiftScaleConfig, model_cls=ShiftScaleModel, quantity="scale o",
    option_sets={"shift_scale": registry.OptionSet(families=("llama", "gpt2", "bert", "vit"))},
)


@pytest.fixture(scope="module", autouse=True)
def fifth_type():
    registry.register(ADAPTER)
    yield ADAPTER
    registry.unregister(ADAPTER.name)  # peft keeps the enum member; no other test sees the type in the registry


# --- the contract, bench and inspect ------------------------------------------------------------------------------
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("family", ADAPTER.option_sets["shift_scale"].families)
def test_fifth_adapter_passes_the_contract_table(check, family, tmp_path):
    check("shift_scale", family, tmp_path)


def test_bench_times_it_as_a_layer_and_end_to_end():
    from scripts import bench

    assert bench.registered_options()["shift_scale"] is ADAPTER
    fn, params, frozen = bench.make_case("shift_scale", "torch", 24, 40, torch.float32, torch.device("cpu"))
    x = torch.randn(bench.BATCH, 5, 24, requires_grad=True)
    y = fn(x)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *params])
    assert y.shape == (bench.BATCH, 5, 40) and len(params) == 2 and all(g.abs().sum() > 0 for g in grads)
    labels = [label for label, _, make in bench._e2e_methods(torch.device("cpu")) if not isinstance(make, str)]
    assert "hadapeft_shift_scale" in labels


def test_inspect_adapter_reports_it():
    from scripts import inspect_adapter

    model = get_peft_model(build_model("llama"), ShiftScaleConfig(init_weights=False, task_type=FAMILIES["llama"][1]))
    kind, stats = inspect_adapter.collect(model)
    assert kind == "SHIFT_SCALE" and inspect_adapter.quantity(kind) == "scale o"
    layer = next(m for m in model.modules() if isinstance(m, ShiftScaleLinear))
    assert stats and stats[0].side == "out"
    assert torch.allclose(stats[0].values, layer.shift_scale_o["default"].detach()[0])
    assert stats[0].extra["shift_norm"] == pytest.approx(layer.shift_scale_b["default"].detach().norm().item())
    assert model(**make_inputs("llama")).logits.isfinite().all()
