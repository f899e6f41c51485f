import pytest
import torch

from auxilia import NonFiniteLossError, Task, TaskError, TaskSet


def test_primary_comes_first_and_roles_follow_primary_argument():
    tasks = TaskSet([Task.regression("b"), Task.classification("a")], primary="a")
    assert tasks.names == ["a", "b"]
    assert tasks.primary.is_primary and not tasks.get("b").is_primary


@pytest.mark.parametrize(
    "tasks, primary, message",
    [
        ([Task.regression("a"), Task.regression("b")], None, "no primary"),
        ([Task.regression("a", "primary"), Task.regression("b", "primary")], None, "more than one primary"),
        ([Task.regression("a"), Task.regression("a")], "a", "duplicate"),
        ([Task.regression("a")], "zzz", "'zzz'"),
        ([], None, "no tasks"),
    ],
)
def test_malformed_task_sets_are_rejected(tasks, primary, message):
    with pytest.raises(TaskError, match=message):
        TaskSet(tasks, primary)


def test_loss_dict_errors_name_the_task():
    tasks = TaskSet(["main", "aux"], primary="main")
    good = torch.tensor(1.0)
    with pytest.raises(TaskError, match="unknown task 'other'"):
        tasks.ordered({"main": good, "aux": good, "other": good})
    with pytest.raises(TaskError, match="no loss given for task 'aux'"):
        tasks.ordered({"main": good})
    with pytest.raises(TaskError, match="task 'aux': loss must be a scalar"):
        tasks.ordered({"main": good, "aux": torch.ones(3)})
    with pytest.raises(NonFiniteLossError, match="'aux'") as info:
        tasks.ordered({"main": good, "aux": torch.tensor(float("nan"))})
    assert info.value.task == "aux"


def test_shape_mismatch_names_the_task():
    task = Task.classification("digit", "primary")
    with pytest.raises(TaskError, match="task 'digit'.*batch size"):
        task.compute_loss(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TaskError, match="task 'digit'"):
        task.compute_loss(torch.randn(4, 10), torch.full((4,), 11, dtype=torch.long))
    with pytest.raises(TaskError, match="task 'digit': mask"):
        task.compute_loss(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(3))


def test_masked_loss_averages_only_labelled_samples_and_stays_on_graph():
    task = Task.regression("r", "primary")
    out = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    target = torch.zeros(4)
    mask = torch.tensor([True, False, True, False])
    loss = task.compute_loss(out, target, mask)
    assert loss.item() == pytest.approx((1 + 9) / 2)
    nobody = task.compute_loss(out, target, torch.zeros(4, dtype=torch.bool))
    assert nobody.item() == 0.0 and nobody.requires_grad
    nobody.backward()
    assert torch.equal(out.grad, torch.zeros(4))


def test_pixelwise_losses_reduce_per_sample():
    task = Task.classification("seg", "primary")
    logits = torch.randn(2, 5, 4, 4)
    target = torch.randint(0, 5, (2, 4, 4))
    expected = torch.nn.functional.cross_entropy(logits, target)
    assert task.compute_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
