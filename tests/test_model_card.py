"""Model cards (trl_ext/core/model_card.py): valid settings tables, and the metrics of every method a trainer runs."""

from conftest import GatedGNDPOConfig, GatedGNDPOTrainer, cpu_config
from trl_ext.core.model_card import table_cell


def test_table_cells_keep_one_row_and_show_the_value():
    assert table_cell(0.5) == "`0.5`" and table_cell(None) == "`None`"
    assert table_cell("a\nb|c") == "`a\\nb\\|c`"
    assert table_cell("run `x`") == "`` run `x` ``" and table_cell("``x") == "``` ``x ```"


def test_card_of_a_gated_trainer_shows_the_gates_metrics(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GatedGNDPOConfig, tmp_path, loss_type="dapo", gate="threshold", max_steps=1)
    trainer = GatedGNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                                teacher_model=teacher_path)
    trainer.train()
    trainer.create_model_card(model_name="tiny-gated-gndpo")
    card = (tmp_path / "README.md").read_text()
    metrics = card.split("## Final metrics")[1]
    assert "| `gndpo/reverse_kl` |" in metrics and "| `delight/pass_rate` |" in metrics
    assert "| `gate` | `threshold` |" in card
