"""A DeepSpeed user's image-classification script, as DeepSpeedExamples' CIFAR-10 one is
written (training/cifar/cifar10_deepspeed.py), on synthetic data.

It touches DeepSpeed's API the way that script does: argparse with the script's own
--local_rank and deepspeed.add_config_arguments (run with --deepspeed), init_distributed(),
LOCAL_RANK from the environment into get_accelerator().set_device(), torch.distributed's
get_rank()/barrier() around building the dataset (the original downloads CIFAR there),
deepspeed.initialize(args=, model=, model_parameters=<filter>, training_data=, config=<dict>)
and its training loader, get_accelerator().device_name(engine.local_rank),
bfloat16_enabled()/fp16_enabled(), the loss computed outside the engine, backward/step,
loss.item(), then engine.eval() and no-grad forwards of another batch size over a test set.

No download: 3x8x8 "images" drawn from a fixed seed, 10 classes given by a fixed random
projection (so the loss can fall). The only DeepSpeed-specific line is `import deepspeed`;
tests/test_deepspeed_scripts.py runs this file under real DeepSpeed (the fixtures in
tests/data/deepspeed_fixtures/) and under zerofx (zerofx.as_deepspeed() first).

Rank 0 writes {"losses": [per micro-step loss], "eval": {...}} as JSON to --losses_out.
"""
import argparse
import json
import os

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

IMAGE_SHAPE = (3, 8, 8)
NUM_CLASSES = 10


def parse_args():
    parser = argparse.ArgumentParser(description="CIFAR-style DeepSpeed script")
    parser.add_argument("-e", "--epochs", type=int, default=2,
                        help="passes over the training set")
    parser.add_argument("--local_rank", type=int, default=-1,
                        help="local rank passed from distributed launcher")
    parser.add_argument("--log-interval", type=int, default=5,
                        help="print the running loss every this many micro-batches")
    parser.add_argument("--dtype", type=str, default="fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--train_samples", type=int, default=160)
    parser.add_argument("--test_samples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--losses_out", type=str, default=None,
                        help="rank 0 writes the per-step losses here (JSON)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def ds_config_for(args):
    """The DeepSpeed config, built in the script as the original does (same keys)."""
    return {
        # 8 samples per rank and micro-step, 2 ranks, 2 micro-steps per optimizer step
        "train_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "steps_per_print": 5,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 0.01, "betas": [0.8, 0.999], "eps": 1e-8,
                       "weight_decay": 0.01},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.01, "warmup_num_steps": 4},
        },
        "gradient_clipping": 0.5,
        "prescale_gradients": False,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {
            "enabled": args.dtype == "fp16",
            "fp16_master_weights_and_grads": False,
            "loss_scale": 0,
            "loss_scale_window": 500,
            "hysteresis": 2,
            "min_loss_scale": 1,
            "initial_scale_power": 15,
        },
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": args.stage,
            "allgather_partitions": True,
            "reduce_scatter": True,
            "allgather_bucket_size": 50000000,
            "reduce_bucket_size": 50000000,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "cpu_offload": False,
        },
    }


class SyntheticImages(torch.utils.data.Dataset):
    """`count` images with values in [-1, 1] (the original's Normalize range) and labels
    from a fixed projection: the same tensors on every rank and every run."""

    def __init__(self, count, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand((count,) + IMAGE_SHAPE, generator=g) * 2 - 1
        projection = torch.randn(NUM_CLASSES, IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2],
                                 generator=torch.Generator().manual_seed(7))
        self.labels = (self.images.flatten(1) @ projection.T).argmax(dim=1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class SmallConvNet(nn.Module):
    """Two conv + pool blocks and three linear layers, sized for 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.conv_b = nn.Conv2d(6, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.hidden_a = nn.Linear(16 * 2 * 2, 48)
        self.hidden_b = nn.Linear(48, 32)
        self.classifier = nn.Linear(32, NUM_CLASSES)

    def forward(self, images):
        h = self.pool(F.relu(self.conv_a(images)))
        h = self.pool(F.relu(self.conv_b(h)))
        h = h.view(-1, 16 * 2 * 2)
        h = F.relu(self.hidden_a(h))
        h = F.relu(self.hidden_b(h))
        return self.classifier(h)


def evaluate(engine, testset, device, target_dtype, batch_size=4):
    """Accuracy (overall and per class) and the mean loss of the eval-mode engine."""
    loader = torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False,
                                         num_workers=0)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    correct, total, loss_sum = 0, 0, 0.0
    per_class_correct = [0] * NUM_CLASSES
    per_class_total = [0] * NUM_CLASSES
    engine.eval()
    with torch.no_grad():
        for images, labels in loader:
            if target_dtype is not None:
                images = images.to(target_dtype)
            outputs = engine(images.to(device))
            labels = labels.to(device)
            loss_sum += criterion(outputs.float(), labels).item()
            predicted = outputs.argmax(dim=1)
            hits = predicted == labels
            correct += hits.sum().item()
            total += labels.size(0)
            for label, hit in zip(labels.tolist(), hits.tolist()):
                per_class_correct[label] += int(hit)
                per_class_total[label] += 1
    if engine.local_rank == 0:
        print(f"accuracy on {total} test images: {100 * correct / total:.0f} %")
    return {"correct": correct, "total": total, "mean_loss": loss_sum / total,
            "per_class_correct": per_class_correct, "per_class_total": per_class_total}


def main(args):
    deepspeed.init_distributed()
    local_rank_env = int(os.environ.get("LOCAL_RANK"))
    get_accelerator().set_device(local_rank_env)

    # The original lets rank 0 download CIFAR while the others wait.
    if torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
    trainset = SyntheticImages(args.train_samples, seed=args.seed)
    testset = SyntheticImages(args.test_samples, seed=args.seed + 1)
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()

    torch.manual_seed(args.seed)  # every rank builds the same initial model
    net = SmallConvNet()
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    engine, optimizer, trainloader, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset,
        config=ds_config_for(args))

    device = get_accelerator().device_name(engine.local_rank)
    local_rank = engine.local_rank
    target_dtype = None
    if engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif engine.fp16_enabled():
        target_dtype = torch.half

    criterion = nn.CrossEntropyLoss()
    losses = []
    for epoch in range(args.epochs):
        running_loss = 0.0
        for i, data in enumerate(trainloader):
            inputs, labels = data[0].to(device), data[1].to(device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = engine(inputs)
            loss = criterion(outputs, labels)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            running_loss += losses[-1]
            if local_rank == 0 and i % args.log_interval == args.log_interval - 1:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / args.log_interval:.4f}")
                running_loss = 0.0
    print("Finished Training")

    result = {"losses": losses, "eval": evaluate(engine, testset, device, target_dtype)}
    if local_rank == 0 and args.losses_out:
        with open(args.losses_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(parse_args())
