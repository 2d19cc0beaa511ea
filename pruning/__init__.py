"""SAViT's pruning, one module a step; the sections are those of docs/METHOD.md.

    mask          the three components and their shapes (section 1; the mask itself: models.mask)
    feed          which training batches feed the pass (section 2)
    criteria      the first-order criteria of --pruning_method 1-4 (section 2)
    interactions  the estimator of the 3x3 interaction matrix C (section 3)
    scoring       the pass: sums the criteria and C over the fed batches, all-reduced (sections 2-3)
    pickles       the criteria and C files of a pass, in the reference's names (sections 2-3)
    evolution     the reference's FLOPs model, objective and evolution strategy (section 4)
    selection     which units go, given how many of each component (section 4)
    search        how many units go: the allocation modes and the MACs calibration (sections 4, 7)
    flops         analytic and ptflops MACs and parameter counts (sections 4-5)
    baselines     magnitude, random and uniform masks for the ablation (benchmarks/ablation.py)
    export        ONNX / TorchScript / torch.export of a pruned model (section 5)
"""
