"""The examples and notes under each command's ``--help`` (Markdown, rendered by Typer's rich mode)."""

EXTRACT_EPILOG = """
**Examples**

* `mimprobe extract vit_tiny_patch16_224 digits --img-size 32 --out features`
* `mimprobe extract vit_base_patch16_224 ./imagenet-subset --checkpoint mae_pretrain_vit_base.pth --pool cls,mean --out features`
* `mimprobe extract vit_small_patch16_224 data.npz --blocks last:4 --store-dtype float32 --json --out features`

Run the same command again to resume an interrupted extraction or to reuse a finished one. Two runs that write
the same store take turns: the second waits for the first (or stops with `--no-wait`) and then reuses its store;
a run that was killed leaves nothing locked. A store is checked whenever it is opened (its manifest, and every
file's shape, dtype and size); `--verify` also reads every value, and `--overwrite` extracts a damaged store anew.

Across processes or machines: `torchrun --nproc_per_node N -m mimprobe.cli extract ...` (gloo on CPU, NCCL on GPU)
gives every process every N-th batch, written in place into the same store (a shared filesystem across machines):
the files are byte-identical to one process's, and a killed run resumes with any number of processes.
"""

PROFILE_EPILOG = """
**Examples**

* `mimprobe profile vit_tiny_patch16_224 digits --img-size 32 --out profiles/digits`
* `mimprobe profile vit_base_patch16_224 ./cifar10 --checkpoint mae.pth --pool cls,mean --metrics knn,linear --out p`
* `mimprobe profile features/vit_tiny_patch16_224__digits__eed481c4aa1f --out p --preset dino --json`

TARGET is a timm model name (then DATA is required and the features are extracted, or reused, under
--features) or a feature store folder from `mimprobe extract`.

A checkpoint series, over training: `--checkpoint 'runs/mae/checkpoint-*.pth'` (a quoted glob) or `--checkpoint
runs/mae` (a run folder of checkpoint-<epoch>.pth files, as `mimprobe pretrain-mae --save-every 1` writes them)
profiles every checkpoint in epoch order (numerically), each in its own store (reused when it exists), into
OUT/checkpoints/NAME, and writes OUT/series.csv (a `checkpoint` column, plus checkpoint_step and checkpoint_order)
and OUT/series.png (per headline curve, a heatmap of blocks x checkpoints, each checkpoint's best block boxed).

Under `torchrun --nproc_per_node N -m mimprobe.cli profile ...` every process extracts its share of the batches
and searches its shard of the k-NN bank (merged top-k lists); the probes, low-shot, clustering and rank run on
rank 0, which alone writes the files.
"""

INFO_EPILOG = """
**Examples**

* `mimprobe info vit_base_patch16_224`
* `mimprobe info vit_large_patch16_224 --checkpoint mae_pretrain_vit_large.pth --json`
* `mimprobe info vit_huge_patch14_gap_224 --checkpoint IN1K-vit.h.14-300e.pth.tar`  (I-JEPA: no CLS token)
* `mimprobe info test_vit --model-kwargs class_token=false,global_pool=avg,fc_norm=false`

data_config_source says where the normalisation and crop come from: the checkpoint family's evaluation
preprocessing (MAE, data2vec 2.0, MIM-Refiner, DINO/DINOv2, I-JEPA), timm's data config of the model name, or
--mean/--std/--interpolation/--crop-pct.
"""

PLACE_EPILOG = """
**Examples**

* `mimprobe place profiles/digits`  (peak rule on k-NN top-1 of the val split; writes profiles/digits/placement.json)
* `mimprobe place profiles/mae-large --max-heads 8 --freeze 0.25 --out placement.json`
* `mimprobe place profiles/digits --metric linear --plateau 0.01 --json`
* `mimprobe place profiles/digits --blocks 8,9,10,11`  (explicit blocks; --blocks last:4 is rule last-n)
* `mimprobe place profiles/unlabelled --rule label-free`  (no labels: from the block the TwoNN intrinsic dimension's
  rule picks; `--rule label-free:alpha_req` reads another label-free curve)

The peak rule (MIM-Refiner, arXiv 2402.10093) puts heads from the first block of the peak plateau to the last
block; it reads only the validation split of the profile, never test. Blocks are 0-based.
"""

REFINE_EPILOG = """
**Examples**

* `mimprobe refine vit_tiny_patch16_224 digits --img-size 32 --auto --epochs-heads 1 --epochs 2 --batch-size 64 --queue-size 1024 --head-dims 256,64,256 --out runs/refine-digits`
* `mimprobe refine vit_large_patch16_224 ./imagenet --checkpoint mae_pretrain_vit_large.pth --placement placement.json --epochs 20 --batch-size 1024 --out runs/mae-l`
* `torchrun --nproc_per_node 8 -m mimprobe.cli refine vit_large_patch16_224 ./imagenet --checkpoint mae.pth --placement placement.json --out runs/mae-l`

Every epoch (and on SIGTERM) a checkpoint is written; rerun with `--resume` to continue exactly. The result,
OUT/refined.safetensors, is a plain timm state dict of the EMA encoder: `mimprobe profile MODEL DATA --checkpoint
OUT/refined.safetensors` measures it.

The defaults are MIM-Refiner's main recipe, read from the official configurations (`--recipe` prints each one with
its source line): 2 global crops (0.25-1) + 10 local 96/224-size crops (0.05-0.25), lr 2e-4 (heads stage) and
4e-4 (full stage) per 256 images, 4 warmup epochs, cosine to an absolute 1e-6, encoder EMA 0.9999 from the first
step, Xavier-uniform heads. Scaled to small data only where it must be: the warmup takes at most 40 % of a stage
(binds below 10 epochs) and the default queue is cut to the training set. The earlier defaults remain options:
`--local-crops 0 --global-scale-min 0.08 --ema-warmup --lr-heads 1e-4 --lr 1e-4 --warmup-fraction 0.1
--head-init truncnormal`.
"""

COMPARE_EPILOG = """
**Examples**

* `mimprobe compare profiles/before profiles/after --out reports/digits`
* `mimprobe compare base nna-4heads nna-8heads --labels mae,4-heads,8-heads --out reports/heads --overwrite`
* `mimprobe compare before after --placement runs/mae-l/placement.json --cka-rows 5000 --json --out report`
* `mimprobe compare profiles/mae profiles/data2vec2 profiles/refined --no-cka --out reports/figure1`
* `mimprobe compare profiles/mae-series --out reports/over-training`  (a checkpoint series: one profile per epoch)

Each input is a `mimprobe profile` folder, or a checkpoint series' folder (`mimprobe profile --checkpoint
'run/checkpoint-*.pth'`: its checkpoints' profiles, in training order); with more than two, every one is compared
with the first, and all are drawn on one figure per curve over the relative depth block / (depth - 1). OUT gets
report.html (self-contained: it opens offline), report.md, the figures as PNG and SVG, compare.csv/.parquet,
best.csv, class_gains.csv, cka_*.csv and compare.json. The placement is read from the refine run folder of the
after profile's checkpoint (RUN/placement.json) unless --placement is given. Blocks are 0-based.
"""

PRETRAIN_EPILOG = """
**Examples**

* `mimprobe pretrain-mae vit_tiny_patch16_224 digits --img-size 64 --epochs 10 --out runs/mae-digits`
* `mimprobe pretrain-mae vit_small_patch16_224 ./my-images --img-size 96 --epochs 100 --batch-size 128 --out runs/mae`
* `mimprobe pretrain-mae vit_small_patch16_224 ./my-images --img-size 96 --epochs 100 --batch-size 128 --out runs/mae --resume`
* `mimprobe profile vit_tiny_patch16_224 digits --img-size 64 --checkpoint runs/mae-digits/mae.pth --out runs/profile`

Trains on the train split only (labels are not used; a folder of unlabelled images works). OUT gets
config.json, log.csv (step, epoch, loss, lr, images_per_second), checkpoint-last.pth (every epoch; --resume
continues from it exactly) and mae.pth, an official-layout MAE checkpoint for --checkpoint.
"""

RUN_EPILOG = """
**Examples**

* `mimprobe run analyses/demo.toml`
* `mimprobe run analyses/cifar10-cpu.toml --json`
* `mimprobe run analyses/mae-large-gpu.toml --out runs/mae-large-again --overwrite`

The steps, each in its own folder under the spec's `out`: pretrain (only with a `[pretrain]` section),
profile-before, placement, refine, profile-after, compare. The spec's keys mirror the options of those
commands (see the files in analyses/); the resolved spec, every default filled in, is written to
OUT/spec.resolved.toml. Run the same command again after an interruption: finished steps are skipped and the
interrupted one resumes. An OUT that holds another spec's run is refused unless `--overwrite`.
"""

DEMO_EPILOG = """
**Examples**

* `mimprobe demo`  (writes mimprobe-demo/ in the current folder: about 3 minutes on a 2-core CPU, longer when it is busy)
* `mimprobe demo --out /tmp/demo --json`
* `mimprobe demo --fast --out /tmp/smoke`  (a seconds-long run on synthetic images that checks the installation)

A ViT-Tiny is pre-trained as a masked autoencoder on scikit-learn's 8x8 handwritten digits (shipped with
scikit-learn: no download), profiled block by block, given NNA refinement heads from its k-NN peak to the last
block, refined, profiled again, and the two profiles are compared in OUT/compare/report.html. It is
`mimprobe run` on analyses/demo.toml; rerun it to resume, or after it finished to see every step skipped.
"""
