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


@pytest.mark.parametrize(
    "task, output, target",
    [
        (Task.regression("r", "primary"), torch.randn(6, 1), torch.randn(6)),
        (Task.regression("r", "primary"), torch.randn(6), torch.randn(6, 1)),
        (Task.regression("r", "primary"), torch.randn(6, 3), torch.randn(6, 1)),
        (Task.regression("r", "primary"), torch.randn(6, 1, 4, 4), torch.randn(6, 4, 4)),
        (Task.classification("c", "primary"), torch.randn(6, 5), torch.zeros(6, 1, dtype=torch.long)),
        (Task.classification("c", "primary"), torch.randn(6, 5, 4), torch.zeros(6, 1, dtype=torch.long)),
        (Task.classification("c", "primary"), torch.randn(6, 5), torch.rand(6, 1)),
    ],
)
def test_broadcastable_shape_mismatches_are_refused_naming_task_and_shapes(task, output, target):
    # (B, 1) against (B,) broadcasts to (B, B): its mean is a plausible but wrong number
    shapes = rf"\({', '.join(map(str, output.shape))},?\).*\({', '.join(map(str, target.shape))},?\)"
    with pytest.raises(TaskError, match=rf"task '{task.name}'.*{shapes}"):
        task.compute_loss(output, target)
    with pytest.raises(TaskError, match=rf"task '{task.name}'"):
        task.per_sample_loss(output, target)


def test_regression_of_matching_shapes_gives_the_true_mean():
    task = Task.regression("r", "primary")
    output, target = torch.randn(8, 1), torch.randn(8)
    assert float(task.compute_loss(output, target.unsqueeze(1))) == pytest.approx(float(((output.squeeze(1) - target) ** 2).mean()))
    assert float(task.compute_loss(output.squeeze(1), target)) == pytest.approx(float(((output.squeeze(1) - target) ** 2).mean()))


def test_classification_accepts_indices_and_soft_labels_of_the_output_shape():
    task = Task.classification("c", "primary")
    logits = torch.randn(4, 3)
    soft = torch.softmax(torch.randn(4, 3), dim=1)
    expected = torch.nn.functional.cross_entropy(logits, soft)
    assert float(task.compute_loss(logits, soft)) == pytest.approx(float(expected), rel=1e-6)
    metric = task.new_metrics()["accuracy"]
    metric.update(logits, soft)
    assert metric.compute() == float((logits.argmax(1) == soft.argmax(1)).float().mean())


def _broadcasting(output, target):
    return (output - target) ** 2


def _broadcast_then_reduce(output, target):
    return ((output - target) ** 2).mean(dim=1)


def test_a_custom_loss_evaluated_on_a_broadcast_is_refused():
    task = Task("custom", _broadcasting, "primary")
    with pytest.raises(TaskError, match=r"task 'custom'.*\(6, 6\).*\(6, 1\).*\(6,\)"):
        task.compute_loss(torch.randn(6, 1), torch.randn(6))
    assert task.compute_loss(torch.randn(6), torch.randn(6)).shape == ()
    # one that reduces after broadcasting is only caught when the task declares its shapes
    declared = Task("custom", _broadcast_then_reduce, "primary", target_shape="same")
    with pytest.raises(TaskError, match=r"task 'custom'.*\(6, 1\).*\(6,\)"):
        declared.compute_loss(torch.randn(6, 1), torch.randn(6))
    with pytest.raises(TaskError, match="target_shape"):
        Task("custom", _broadcasting, target_shape="broadcast")  # type: ignore[arg-type]


def test_a_custom_loss_must_return_one_tensor_value_per_sample():
    with pytest.raises(TaskError, match="task 'x'.*per sample"):
        Task("x", lambda o, t: (o - t).pow(2).mean(), "primary").compute_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(TaskError, match="task 'x'.*tensor"):
        Task("x", lambda o, t: 1.0, "primary").compute_loss(torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_error_metrics_refuse_a_broadcast(metric):
    from auxilia.tasks import absolute_error, squared_error

    fn = squared_error if metric == "mse" else absolute_error
    with pytest.raises(TaskError, match=r"\(5, 1\).*\(5,\)"):
        fn(torch.randn(5, 1), torch.randn(5))
    made = Task.regression("r", "primary").new_metrics()[metric]
    with pytest.raises(TaskError, match=r"task 'r'.*\(5, 1\).*\(5,\)"):
        made.update(torch.randn(5, 1), torch.randn(5))
    assert made.count == 0


def test_a_custom_per_sample_metric_that_broadcasts_is_refused():
    task = Task("r", _broadcasting, "primary", {"err": _broadcasting})
    metric = task.new_metrics()["err"]
    with pytest.raises(TaskError, match=r"task 'r'.*\(4, 4\)"):
        metric.update(torch.randn(4, 1), torch.randn(4))
    metric.update(torch.zeros(4), torch.ones(4))
    assert metric.compute() == 1.0


def test_accuracy_refuses_a_target_with_a_class_dimension():
    metric = Task.classification("c", "primary").new_metrics()["accuracy"]
    with pytest.raises(TaskError, match=r"task 'c'.*\(4, 3\).*\(4, 1\)"):
        metric.update(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))


def test_tasks_named_by_string_are_regression_with_matching_shapes():
    tasks = TaskSet(["main", "aux"], primary="main")
    with pytest.raises(TaskError, match="task 'aux'"):
        tasks.get("aux").compute_loss(torch.randn(3, 1), torch.randn(3))
