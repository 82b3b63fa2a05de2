"""Models for the reference experiments, sized for 28-32 px images."""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): three stages of ``blocks`` blocks,
    widths ``width``, ``2 * width``, ``4 * width``; depth ``6 * blocks + 2``.

    Args:
        in_channels: image channels.
        num_classes: logits per sample.
        blocks: blocks per stage (1 gives ResNet-8, 3 gives ResNet-20).
        width: channels of the first stage.

    Example:
        >>> import torch
        >>> from ipsd_cuda.reference.models import SmallResNet
        >>> SmallResNet(1, 10)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, blocks: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = ("resnet8", "resnet20", "resnet18")


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """``resnet8`` / ``resnet20`` (:class:`SmallResNet`), or torchvision's ``resnet18``
    with a 3x3 stride-1 stem and no max-pool, as usual for 32 px images."""
    if name == "resnet8":
        return SmallResNet(in_channels, num_classes, blocks=1)
    if name == "resnet20":
        return SmallResNet(in_channels, num_classes, blocks=3)
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
