"""One forward pass: validation during training, evaluate/predict and explain give the same
outputs for the same model and images."""

from __future__ import annotations

import numpy as np
import torch

from imagefit.augment.pipeline import BatchPipeline
from imagefit.config import AugmentOptions
from imagefit.data.cache import CacheSettings
from imagefit.data.loader import Loader
from imagefit.evaluation.inference import LoadedModel
from imagefit.evaluation.saliency import loaded_outputs as explain_outputs
from imagefit.forward import TTA, model_outputs
from imagefit.models import create_model
from imagefit.tasks import Task
from imagefit.train.learner import Learner


def test_validation_evaluate_and_explain_share_one_forward_pass():
    torch.manual_seed(0)
    task = Task("classification", [str(i) for i in range(4)])
    model = create_model("small_cnn", 3, task.n_out).to(memory_format=torch.channels_last)
    with torch.no_grad():  # weights away from their initial values, BatchNorm statistics too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        model.train()
        model(torch.randn(16, 3, 20, 20))
    images = torch.randint(0, 256, (10, 20, 20, 3), dtype=torch.uint8)
    targets = torch.arange(10) % 4
    pipeline = BatchPipeline([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    rows = np.arange(10)
    loader = Loader(images, targets, rows, 4)
    learner = Learner(model, task, loader, loader, pipeline, precision="fp32")
    validation, seen = learner.predict(loader)
    assert torch.equal(seen, targets)
    evaluated = model_outputs(model, pipeline, task, images, rows, 3)  # another batch size
    loaded = LoadedModel(model, task, CacheSettings(20, 3, "squish"), pipeline, {}, "fp32")
    explained = explain_outputs(loaded, images.permute(0, 3, 1, 2))
    assert validation.shape == (10, 4)
    torch.testing.assert_close(evaluated, validation, atol=1e-6, rtol=0)
    torch.testing.assert_close(explained, validation, atol=1e-6, rtol=0)
    assert not torch.allclose(validation[0], validation[1])  # outputs of different images
    # TTA with no versions is the plain pass; with the mirror image it is another figure
    assert torch.allclose(model_outputs(model, pipeline, task, images, rows, 4, TTA(n=0)),
                          validation, atol=1e-6)
    flipped = model_outputs(model, pipeline, task, images, rows, 4,
                            TTA(1, AugmentOptions(flip=1.0)))
    assert not torch.allclose(flipped, validation, atol=1e-4)
