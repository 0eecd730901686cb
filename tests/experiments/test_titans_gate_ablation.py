import torch

from experiments import titans_gate_ablation as ablation
from growmem.training.data import build_task_data


def test_shared_start_gives_grm_residuals_outputs_and_uniform_gates(tmp_path):
    config = ablation._config("residual", seed=0)
    config.task.num_train_examples = 8
    data = build_task_data(config.task, 0, tmp_path)
    ids = data.train.batch_at(0, 2, seed=0)["input_ids"]  # [2, 64]
    residual = ablation.shared_start("residual", data, seed=0)
    grm = ablation.shared_start("grm", data, seed=0)
    soup = ablation.shared_start("soup", data, seed=0)
    for layer in grm.model.layers:
        rows = layer.mixer.in_proj.weight.shape[0] // 5  # [q k v u gate], u in the middle
        assert torch.count_nonzero(layer.mixer.in_proj.weight[3 * rows : 4 * rows]) == 0
    with torch.no_grad():
        logits = [model(input_ids=ids).logits for model in (residual, grm, soup)]
    residual_logits, grm_logits, soup_logits = logits  # [2, 64, vocab] each
    # uniform gates: grm's read is residual's sum over the memories divided by their number,
    # a per-token scale that the output RMSNorm removes (up to its eps)
    torch.testing.assert_close(grm_logits, residual_logits, rtol=1e-3, atol=1e-4)
    # soup mixes parameters, not outputs: another function of the same weights
    assert (soup_logits - residual_logits).abs().max() > 1e-3
