"""The table `lowcomm plan` prints."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dataclasses import fields

from lowcomm.config import ConfigError, OuterConfig, PlanConfig, SimulateConfig, parse_count
from lowcomm.sim import plan
from lowcomm.sim.network import NetworkSpecError, format_bandwidth, parse_duration, swarm_round
from lowcomm.optimizers.registry import get_algorithm
from lowcomm.sim.overlap import DEFAULT_BACKWARD_SHARE
from lowcomm.sim.simulate import backward_share_given, network_of, note_ignored, validate


def run_plan(cfg: PlanConfig, console: Console) -> list[dict]:
    params = parse_count("--params", cfg.params)
    shared = SimulateConfig(**{f.name: getattr(cfg, f.name) for f in fields(OuterConfig)}, workers=cfg.workers,
                            algorithms=cfg.algorithms, bandwidth=cfg.bandwidth, latency=cfg.latency,
                            step_time=cfg.step_time, backward_share=cfg.backward_share)
    validate(shared)
    network = network_of(shared)
    share = backward_share_given(cfg.backward_share)
    backward_share = DEFAULT_BACKWARD_SHARE if share is None else share
    try:
        step_time = parse_duration(cfg.step_time)
    except NetworkSpecError as e:
        raise ConfigError("--step-time", str(e)) from None
    if cfg.steps < 0:
        raise ConfigError("--steps", "must be >= 0")
    rows = []
    table = Table("algorithm", "H", "codec", "bytes sent / exchange", "exchange time", "compute utilisation",
                  "bandwidth for 95%", title=f"{params:,} parameters, {cfg.workers} workers, step {cfg.step_time} "
                                               f"(backward {backward_share:.0%}), {cfg.bandwidth} / {cfg.latency}")
    for alg in cfg.algorithm_list():
        spec = get_algorithm(alg)
        note_ignored(spec, cfg.outer_options(), console)
        s = spec.settings(cfg.outer_options())
        if s.sync_every % s.fragments or s.delay >= s.sync_every // s.fragments:
            raise ConfigError("--delay", f"{alg} needs H divisible by fragments and delay < H/P; got "
                                         f"H={s.sync_every}, P={s.fragments}, delay={s.delay}")
        sched = spec.schedule(s, params, cfg.workers)
        steps = cfg.steps or 20 * sched.every
        clock = plan.predict(sched, step_time, network, steps, backward_share)
        need = plan.bandwidth_for(sched, step_time, network.latency, steps, backward_share=backward_share)
        codec = sched.compressor
        phases = plan.exchange_phases(codec, sched.numels[0], sched.group)
        one = sum(sent for sent, _ in phases)
        rows.append({"algorithm": alg, "utilization": clock.utilization, "bandwidth_for_95pct_bps": need,
                     "bytes_per_exchange": one})
        table.add_row(alg, str(sched.every), codec.name, f"{one / 1e6:,.2f} MB",
                      f"{network.transfer_time(phases if sched.overlap_backward else swarm_round(phases)):.3f} s", f"{clock.utilization:.3f}",
                      format_bandwidth(need) if need else "unreachable (latency)")
    console.print(table)
    return rows
