"""Every MLflow tag the project writes, by name (docs/architecture.md, Tracking: what each one means).

Code reads and writes tags through these names only, so a tag is spelt once and can be searched for.
"""

# filters of the run list
STAGE = "stage"
MODEL = "model"
DATASET = "dataset"
MODEL_PRESET = "model.preset"  # vocoder stages
ENCODER = "encoder"
ENCODER_LAYER = "encoder.layer"

# progress, checkpoints, resume, stop
PROGRESS = "progress"
CHECKPOINT_LATEST = "checkpoint.latest"  # artifact path of the latest committed checkpoint
CHECKPOINT_LATEST_STEP = "checkpoint.latest_step"
RESUME_COUNT = "resume.count"
RESUME_FROM = "resume.from"
RESUME_BRANCH_OF = "resume.branch_of"
STOP_REQUESTED = "stop_requested"  # the dashboard's stop button: set to "true"
STOPPED_BY = "stopped_by"  # signal | tag | a hook's reason (e.g. pruned)
STOP_ABORTED = "stop.aborted"
WORLD_SIZE = "world_size"  # processes (torchrun ranks) the latest attempt trains with; also a param of the first
EFFECTIVE_BATCH = "effective_batch_size"  # batch_size per rank x world_size, of the latest attempt
JOB_KEY = "job.key"  # resume=auto: the key a later launch of the same job finds this run by (e.g. slurm:1234)
REQUEUE = "requeue"  # "waiting": stopped by SIGUSR1 to be requeued; removed when a later attempt resumes

# the run `mlflow run` created for a resume: this attempt's record
ATTEMPT_NUMBER = "attempt.number"
ATTEMPT_OF = "attempt.of"
ATTEMPT_CHECKPOINT = "attempt.checkpoint"
ATTEMPT_OVERRIDES = "attempt.overrides"
ATTEMPT_CHANGES = "attempt.changes"

# runs built on other runs
CHAIN_ADAPTER_RUN = "chain.adapter_run"
CHAIN_VOCODER_RUN = "chain.vocoder_run"
CHAIN_MAIN_RUN = "chain.main_run"
CHAIN_PREVIOUS_RUN = "chain.previous_run"
CHAIN_CODE_VERSION = "chain.code_version"
CHAIN_REUSED = "chain.reused"
CHAIN_STEP = "chain.{step}"  # on main's own run: the run of each step
CHAIN_MODEL = "chain.model"  # on main's own run: the registered chain, models:/speech-restoration/<version>


def chain_step(step: str) -> str:
    return CHAIN_STEP.format(step=step)


# sweeps: the study's parent run and one nested run per trial
SWEEP_STAGE = "sweep.stage"
SWEEP_STUDY = "sweep.study"
SWEEP_WORKER = "sweep.worker"
TRIAL_NUMBER = "trial.number"
TRIAL_STATE = "trial.state"  # RUNNING | COMPLETE | PRUNED | FAIL | INTERRUPTED
TRIAL_RESUMED_FROM = "trial.resumed_from"
BEST_TRIAL = "best.trial"
BEST_RUN_ID = "best.run_id"

# evaluate: on the evaluation run, what it evaluated; on an evaluated run, its latest evaluation
EVAL_KEY = "eval.key"  # hash of what makes two evaluations the same (runs, steps, test set, seed)
EVAL_MODE = "eval.mode"  # chain | noisy | asr | vocoder (a pretrain_vocoder run: copy synthesis only)
EVAL_VOCODER_RUN = "eval.vocoder_run"
EVAL_ADAPTER_RUN = "eval.adapter_run"
EVAL_ASR_RUN = "eval.asr_run"
EVAL_MODEL = "eval.model_uri"
EVALUATION_RUN = "evaluation.run"

# clean_corpus: what the latest attempt ran on
CLEAN_CLUSTER = "clean.cluster"  # e.g. "1 node, 2 CPUs, 0 GPUs; 1 restore worker x 2 threads"
CLEAN_PRECISION = "clean.precision"  # the restore actors' device and precision, decided once

# import_checkpoint
IMPORTED_FROM = "imported_from"
IMPORTED_STEP = "imported.step"
IMPORTED_SHA256 = "imported.sha256"
IMPORTED_FORMAT = "imported.format"
IMPORTED_MODULES = "imported.modules"

# MLflow's own
NOTE = "mlflow.note.content"  # the run description (Markdown)
RUN_NAME = "mlflow.runName"
PARENT_RUN = "mlflow.parentRunId"
