"""The evaluation config every ``configs/eval_*.py`` starts from (`base_eval_config`).

Values tagged [paper] are PerCo/PerCoV2's protocol (docs/method.md §7); everything else is
ours ([ours]): the paper does not state it.
"""

import ml_collections


def base_eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # stage-1 training workdir
    c.prior = ""  # "" = CHECKPOINT/prior when trained; "none" = no prior (uniform tokens); or a stage-2 workdir
    c.text_checkpoint = ""  # SD3 text encoders (percov2 convert) for a run trained on precomputed text
    c.label = ""  # run label in tables and plots; "" = the workdir's name
    c.dataset = ml_collections.ConfigDict(
        dict(
            name="coco30k",  # coco30k | kodak | folder | tfds | builtin
            root="",  # image folder (COCO: train2017/) or TFDS directory
            annotations="",  # COCO captions_train2017.json; ground truth for the CLIP score
            image_list="",  # names to evaluate, one per line; COCO-30k: PerCo's list, fetched if empty
            list_cache="",  # where a fetched COCO-30k list is cached ("" = ~/.cache/percov2_jax)
            strict_list=True,  # COCO-30k: require the full 30,000-name list
            captions="",  # folder / kodak: a caption file (COCO json, TSV, JSONL) or {path: caption} json
            # gt | none | file: which caption the decoder is conditioned on (datasets.select_captions)
            conditioning="gt",
            conditioning_captions="",  # conditioning="file": e.g. BLIP-2 captions keyed by file name
            preprocess="resize",  # [paper] PerCo (SD): bicubic resize to size x size, no crop | center_crop | native
            size=512,  # [paper] MSCOCO-30k and Kodak at 512 x 512
            tfds_split="train",
            tfds_image_key="image",
            tfds_caption_key="",
            tfds_id_key="",
            include_grayscale=False,  # builtin: also the grayscale photographs
        )
    )
    # Operating modes: a tuple of dicts (evaluation.modes), e.g. (dict(sample_steps=20, guidance_scale=3.0),
    # dict(sample_steps=2, coding=dict(entropy_mode="uniform"))); () = the checkpoint's sample config. A tuple,
    # not a list: ml_collections overrides only tuples from the command line (--config.modes="[{...}, ...]").
    c.modes = ()
    c.coding = ml_collections.ConfigDict(dict(entropy_mode="", schedule=""))  # "" = the codec's default coding
    # [paper] captions are zlib-coded, so the paper-comparison configs (eval_coco30k, eval_kodak)
    # count caption bits as the papers do; `percov2 compress` defaults to the shorter word-ngram-v1.
    c.caption_coder = "zlib"
    c.resize_policy = "pad"  # sides that are not multiples of 64 (native sizes): pad | resize
    c.seed = 0  # [ours] decoder noise seed, the same for every image (as `percov2 decompress`)
    c.batch_size = 4  # [ours] images per encoder / decoder call on one process (padded to the mesh's batch axes)
    c.shard_size = 64  # [ours] images per resumable unit of work
    c.max_minutes = 0.0  # stop after this wall time per process (resume later); 0 = no limit
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # over each process's local devices
    c.metrics = ml_collections.ConfigDict(
        dict(
            # [paper] PerCoV2 Fig. 4 (+ CLIP score, Fig. 6); mIoU not ported
            names="psnr,ms_ssim,lpips,fid,kid,clip_score",
            lpips_net="alex",  # [paper] PerCo's evaluation LPIPS (torchmetrics default)
            lpips_backbone="",  # torchvision alexnet-owt-7be5be79.pth (or vgg16-397923af.pth)
            lpips_heads="",  # lpips v0.1 weights/v0.1/alex.pth
            inception="",  # pytorch-fid pt_inception-2015-12-05-6726825d.pth
            clip_model="",  # transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14 (torchmetrics' default)
            clip_tokenizer="",  # folder with vocab.json + merges.txt ("" = clip_model)
            random_weights=False,  # smoke runs: random LPIPS / Inception weights (numbers meaningless; reports say so)
            fid_method="sqrtm",  # clean-fid's scipy sqrtm; "eigh": the same trace ~5x faster (metrics.fid)
            kid_subsets=100,  # clean-fid compute_kid defaults
            kid_subset_size=1000,
        )
    )
    return c
