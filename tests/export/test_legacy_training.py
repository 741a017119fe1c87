"""ExecuTorch training programs: the two defects behind the NaN losses of a
first trial (docs/upstream/executorch-training.md) are handled, so a small
conv net trains in ExecuTorch exactly as in torch."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from edgetailor.device.backends.executorch_training import AdamW
from edgetailor.export.legacy_training import executorch_training_program
from edgetailor.server_side.models import LeNet5
from edgetailor.toolkit.native_output import quiet_native_output


def test_conv_net_trains_in_executorch_as_in_torch(generic_split):
    with quiet_native_output():
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    torch.manual_seed(0)
    net = LeNet5()
    x = torch.as_tensor(generic_split.train.images[:96, None] / 255.0, dtype=torch.float32)
    y = torch.as_tensor(generic_split.train.labels[:96])
    buffer = executorch_training_program(net, [x[:32]], y[:32], max_batch=64)
    program = _load_for_executorch_from_buffer(buffer)  # `buffer` outlives the program: it is read from
    grads_at = program.run_method("__et_training_gradients_index_forward", ())[0]
    params_at = program.run_method("__et_training_parameters_index_forward", ())[0]
    names = [n.removeprefix("part.") for n in program.run_method("__et_training_fqn_forward", ())]

    reference = copy.deepcopy(net)
    ref_params = dict(reference.named_parameters())
    # The same update on both sides (torch's AdamW places eps differently from ORT's, which ours follows).
    ref_opt = AdamW([ref_params[n].detach().numpy() for n in names])
    ref_opt.lr = 1e-3
    optimizer = None
    for step in range(3):
        xb, yb = x[step * 32:(step + 1) * 32], y[step * 32:(step + 1) * 32]
        outputs = program.run_method("forward", (xb, yb), clone_outputs=False)
        grads = dict(zip(names, (g.numpy() for g in outputs[grads_at:params_at])))
        if optimizer is None:
            optimizer = AdamW([p.numpy() for p in outputs[params_at:]])
            optimizer.lr = 1e-3
        reference.zero_grad()
        loss = F.cross_entropy(reference(xb), yb)
        loss.backward()
        assert abs(float(outputs[0]) - loss.item()) < 1e-4, step
        for name in ("conv1.weight", "conv2.weight", "fc1.weight"):  # conv grads pass through max-pooling
            want = ref_params[name].grad.numpy()
            assert np.abs(grads[name] - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (step, name)
        optimizer.step([grads[n] for n in names])
        ref_opt.step([ref_params[n].grad.numpy() for n in names])
