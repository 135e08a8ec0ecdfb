"""Every rank meets the same zerofx ConfigError at initialize (a TP plan matching nothing)."""
import torch

import zerofx

zerofx.initialize(model=torch.nn.Sequential(torch.nn.Linear(4, 4)),
                  config={"tensor_parallel": {"size": 2, "plan": {"nothing.*": "colwise"}}})
