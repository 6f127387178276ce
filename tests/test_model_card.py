"""Model cards (trl_ext/core/model_card.py): valid settings tables, and the metrics of every method a trainer runs."""

from conftest import GatedGNDPOConfig, GatedGNDPOTrainer, cpu_config
from trl_ext.core.model_card import final_metrics, table_cell


def test_table_cells_keep_one_row_and_show_the_value():
    assert table_cell(0.5) == "`0.5`" and table_cell(None) == "`None`"
    assert table_cell("a\nb|c") == "`a\\nb\\|c`"
    assert table_cell("run `x`") == "`` run `x` ``" and table_cell("``x") == "``` ``x ```"


def test_final_metrics_are_the_last_values_in_name_order():
    # A resumed run reloads its log history with each entry's keys sorted: the card's rows must not depend on that.
    history = [{"gndpo/b": 1.0, "loss": 3.0, "gndpo/a": 2.0}, {"gndpo/b": 4.0, "gndpo/c": None, "step": 1}]
    assert list(final_metrics(history, ("gndpo/",)).items()) == [("gndpo/a", 2.0), ("gndpo/b", 4.0)]


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
