//! Zones: the thread split across fixture topologies (plain CPU lists, as the caller passes
//! them once intersected with the process's affinity), which helpers fill which chunks, and
//! the real `sched_setaffinity` on the CPUs this host has.

// A zone's ranges are a list, and one range in it is the common case, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Mutex;

use super::plan::SpecError;
use super::run::run_job_with;
use super::*;
use crate::cancel::CancelToken;
use crate::MIB;

const GIB: u64 = crate::GIB;

fn caps(requested: Option<usize>, cgroup: Option<usize>, affinity: usize) -> ThreadCaps {
    ThreadCaps {
        requested,
        cgroup,
        affinity,
        online: 256,
    }
}

/// A job of `sizes` laid end to end, one zone each, on `nodes[i]`'s CPUs within `affinity`
/// (the intersection the caller makes; a node left with none gets an empty list).
fn job(sizes: &[u64], nodes: &[&[usize]], affinity: &[usize]) -> (JobSpec, Vec<JobZone>) {
    let mut at = 0;
    let zones = sizes
        .iter()
        .zip(nodes)
        .enumerate()
        .map(|(i, (&size, cpus))| {
            let zone = JobZone {
                id: format!("mem{i}"),
                ranges: vec![at..at + size],
                cpus: cpus
                    .iter()
                    .copied()
                    .filter(|c| affinity.contains(c))
                    .collect(),
            };
            at += size;
            zone
        })
        .collect();
    let spec = JobSpec {
        start: 0,
        size: at,
        align: 2 * MIB,
        min_chunk: 128 * MIB,
        max_threads: usize::MAX,
        cuts: Vec::new(),
    };
    (spec, zones)
}

fn split(plan: &Plan) -> Vec<(usize, DecidedBy)> {
    plan.zones
        .iter()
        .map(|z| (z.threads, z.decided_by))
        .collect()
}

const ALL: &[usize] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
const NODE0: &[usize] = &[0, 1, 2, 3];
const NODE1: &[usize] = &[4, 5, 6, 7];
const NODE2: &[usize] = &[8, 9, 10, 11];
const NODE3: &[usize] = &[12, 13, 14, 15];

#[test]
fn two_nodes_split_the_budget_in_proportion_to_bytes() {
    let (spec, zones) = job(&[8 * GIB, 8 * GIB], &[NODE0, NODE1], ALL);
    let plan = spec.plan_zoned(&caps(Some(6), None, 16), &zones).unwrap();
    assert_eq!((plan.threads, plan.decided_by), (6, DecidedBy::Requested));
    assert_eq!(split(&plan), [(3, DecidedBy::Requested); 2]);
    assert_eq!(plan.seats, [0, 0, 0, 1, 1, 1]);

    let (spec, zones) = job(&[12 * GIB, 4 * GIB], &[NODE0, NODE1], ALL);
    let plan = spec.plan_zoned(&caps(Some(4), None, 16), &zones).unwrap();
    assert_eq!(
        split(&plan),
        [(3, DecidedBy::Requested), (1, DecidedBy::Requested)]
    );
}

#[test]
fn four_nodes_each_get_a_share_and_never_more_than_their_cpus() {
    let (spec, zones) = job(&[4 * GIB; 4], &[NODE0, NODE1, NODE2, NODE3], ALL);
    let plan = spec.plan_zoned(&caps(None, None, 16), &zones).unwrap();
    // 16 CPUs, 16 threads: every node's four, its own limit named on the tie.
    assert_eq!(plan.threads, 16);
    assert_eq!(split(&plan), [(4, DecidedBy::ZoneCpus); 4]);
    let plan = spec.plan_zoned(&caps(None, Some(8), 16), &zones).unwrap();
    assert_eq!(plan.threads, 8);
    assert_eq!(split(&plan), [(2, DecidedBy::Cgroup); 4]);
}

#[test]
fn asymmetric_nodes_give_the_larger_one_what_the_smaller_cannot_take() {
    let (spec, zones) = job(&[8 * GIB, 8 * GIB], &[&[0, 1], &[2, 3, 4, 5, 6, 7]], ALL);
    let plan = spec.plan_zoned(&caps(Some(7), None, 16), &zones).unwrap();
    assert_eq!(plan.threads, 7);
    assert_eq!(
        split(&plan),
        [(2, DecidedBy::ZoneCpus), (5, DecidedBy::Requested)]
    );
}

#[test]
fn when_every_zone_is_at_its_own_limit_the_job_says_so() {
    let (spec, mut zones) = job(&[8 * GIB, 8 * GIB], &[&[0], &[1]], ALL);
    // A CPU named twice is one CPU.
    zones[0].cpus = vec![0, 0, 0];
    let plan = spec.plan_zoned(&caps(Some(8), None, 16), &zones).unwrap();
    assert_eq!((plan.threads, plan.decided_by), (2, DecidedBy::ZoneCpus));
    assert_eq!(plan.zones[0].cpus, [0]);
    // A zone of one chunk takes one thread, whatever its CPUs.
    let (spec, zones) = job(&[8 * GIB, 128 * MIB], &[NODE0, NODE1], ALL);
    let plan = spec.plan_zoned(&caps(Some(8), None, 16), &zones).unwrap();
    assert_eq!(split(&plan)[1], (1, DecidedBy::MinChunk));
    assert_eq!(split(&plan)[0], (4, DecidedBy::ZoneCpus));
    assert_eq!((plan.threads, plan.decided_by), (5, DecidedBy::ZoneCpus));
}

#[test]
fn a_memory_only_node_has_no_cpu_limit_and_its_zone_reports_none() {
    // Node 1 is CXL memory: no CPUs. Its zone's helpers run wherever the process may.
    let (spec, zones) = job(&[8 * GIB, 8 * GIB], &[NODE0, &[]], ALL);
    let plan = spec.plan_zoned(&caps(Some(12), None, 16), &zones).unwrap();
    assert_eq!(
        split(&plan),
        [(4, DecidedBy::ZoneCpus), (8, DecidedBy::Requested)]
    );
    assert!(plan.zones[1].cpus.is_empty());
}

#[test]
fn affinity_that_excludes_a_node_caps_the_budget_and_empties_that_zone() {
    let (spec, zones) = job(&[8 * GIB, 8 * GIB], &[NODE0, NODE1], NODE0);
    assert!(zones[1].cpus.is_empty());
    let plan = spec.plan_zoned(&caps(None, None, 4), &zones).unwrap();
    assert_eq!((plan.threads, plan.decided_by), (4, DecidedBy::Affinity));
    assert_eq!(split(&plan), [(2, DecidedBy::Affinity); 2]);
}

#[test]
fn a_quota_below_the_node_count_gives_each_zone_one_helper_in_turns() {
    let (spec, zones) = job(
        &[2 * GIB, 6 * GIB, 4 * GIB, GIB],
        &[NODE0, NODE1, NODE2, NODE3],
        ALL,
    );
    let plan = spec.plan_zoned(&caps(None, Some(2), 16), &zones).unwrap();
    assert_eq!((plan.threads, plan.decided_by), (2, DecidedBy::Cgroup));
    assert_eq!(split(&plan), [(1, DecidedBy::Cgroup); 4]);
    // Largest first, so the last turn is short.
    assert_eq!(plan.seats, [1, 2, 0, 3]);
}

#[test]
fn zone_borders_are_chunk_cuts_and_every_chunk_is_in_its_zones_queue() {
    // Borders at odd places: 1 GiB + 6 MiB, and a zone in two ranges.
    let a = 0..GIB + 6 * MIB;
    let b = a.end..a.end + 3 * GIB;
    let c = b.end..b.end + 2 * GIB;
    let spec = JobSpec {
        start: 0,
        size: c.end,
        align: 2 * MIB,
        min_chunk: 128 * MIB,
        max_threads: usize::MAX,
        cuts: vec![GIB],
    };
    let zones = vec![
        JobZone {
            id: "a".into(),
            ranges: vec![a.clone(), c.clone()],
            cpus: vec![0],
        },
        JobZone {
            id: "b".into(),
            ranges: vec![b.clone()],
            cpus: vec![1],
        },
    ];
    let plan = spec.plan_zoned(&caps(Some(2), None, 2), &zones).unwrap();
    let in_zone = |z: usize, chunk: &Range<u64>| {
        zones[z]
            .ranges
            .iter()
            .any(|r| r.start <= chunk.start && chunk.end <= r.end)
    };
    let mut seen = BTreeSet::new();
    for (z, zone) in plan.zones.iter().enumerate() {
        for &c in &zone.chunks {
            assert!(
                in_zone(z, &plan.ranges[c]),
                "{:?} leaves zone {z}",
                plan.ranges[c]
            );
            assert!(seen.insert(c));
        }
    }
    assert_eq!(seen.len(), plan.ranges.len());
    assert!(
        plan.ranges.iter().any(|r| r.end == GIB),
        "the spec's own cut is kept"
    );
    assert_eq!(plan.zones[0].bytes, a.end - a.start + c.end - c.start);
}

#[test]
fn zones_that_leave_a_gap_or_overlap_are_refused() {
    let (spec, mut zones) = job(&[GIB, GIB], &[NODE0, NODE1], ALL);
    zones[1].ranges = vec![GIB + 2 * MIB..2 * GIB];
    let gap = spec.plan_zoned(&caps(None, None, 16), &zones);
    assert_eq!(
        gap.err(),
        Some(SpecError::Zones {
            at: GIB,
            start: 0,
            size: 2 * GIB
        })
    );
    zones[1].ranges = vec![GIB - 2 * MIB..2 * GIB];
    assert!(spec.plan_zoned(&caps(None, None, 16), &zones).is_err());
    zones[1].ranges = vec![GIB..2 * GIB, 0..GIB];
    assert!(spec.plan_zoned(&caps(None, None, 16), &zones).is_err());
    zones[1].ranges = vec![GIB..3 * GIB];
    assert!(spec.plan_zoned(&caps(None, None, 16), &zones).is_err());
}

#[test]
fn no_zones_or_one_zone_without_cpus_plans_as_before() {
    let (spec, zones) = job(&[8 * GIB], &[&[]], ALL);
    let before = spec.plan(&caps(Some(3), None, 16));
    let none = spec.plan_zoned(&caps(Some(3), None, 16), &[]).unwrap();
    assert_eq!(none, before);
    let one = spec.plan_zoned(&caps(Some(3), None, 16), &zones).unwrap();
    assert!(
        one.seats.is_empty(),
        "one unpinned zone must use the shared queue"
    );
    assert_eq!(
        (one.ranges.clone(), one.threads),
        (before.ranges, before.threads)
    );
    assert_eq!(split(&one), [(3, DecidedBy::Requested)]);
}

thread_local! {
    /// The CPUs the stand-in `set_affinity` last pinned this thread to.
    static PINNED: RefCell<Option<Vec<usize>>> = const { RefCell::new(None) };
}

/// Pins nothing, so fixture CPUs this host lacks can be planned for; records the request.
fn pretend(cpus: &[usize]) -> std::io::Result<()> {
    PINNED.with(|p| *p.borrow_mut() = Some(cpus.to_vec()));
    Ok(())
}

/// A chunk, the thread that ran it and the CPUs that thread was pinned to.
type Ran = (Range<u64>, i32, Option<Vec<usize>>);

/// Records where each chunk ran.
#[derive(Default)]
struct Where {
    real: bool,
    ran: Mutex<Vec<Ran>>,
}

impl ChunkWork for Where {
    type Error = String;
    fn run(&self, chunk: Range<u64>) -> Result<(), String> {
        let cpus = if self.real {
            let cpus = crate::sys::affinity_cpus().map_err(|e| e.to_string())?;
            // SAFETY: sched_getcpu has no arguments.
            let on = unsafe { libc::sched_getcpu() };
            assert!(
                cpus.contains(&(on as usize)),
                "ran on CPU {on}, outside {cpus:?}"
            );
            Some(cpus)
        } else {
            PINNED.with(|p| p.borrow().clone())
        };
        self.ran
            .lock()
            .unwrap()
            .push((chunk, crate::sys::gettid(), cpus));
        std::thread::sleep(std::time::Duration::from_millis(1));
        Ok(())
    }
    fn undo(&self, _chunk: Range<u64>) -> Result<(), String> {
        Ok(())
    }
    fn undo_panicked(&self, _chunk: Range<u64>) -> Result<(), String> {
        Ok(())
    }
}

/// Runs the job and checks that every chunk of a zone with CPUs ran on a thread pinned to
/// exactly those, and that at most `threads` helpers served a zone (never the caller).
/// Returns, per zone, the threads that filled it.
fn run_and_check(
    spec: &JobSpec,
    zones: &[JobZone],
    caps: &ThreadCaps,
    set_affinity: super::run::SetAffinity,
    real: bool,
) -> (Plan, Vec<BTreeSet<i32>>, JobStats) {
    let plan = spec.plan_zoned(caps, zones).unwrap();
    let work = Where {
        real,
        ..Where::default()
    };
    let done = run_job_with(spec, &plan, &work, &CancelToken::new(), set_affinity).unwrap();
    let caller = crate::sys::gettid();
    let allowed = crate::sys::affinity_cpus().unwrap();
    let mut fillers = vec![BTreeSet::new(); zones.len()];
    let ran = work.ran.into_inner().unwrap();
    assert_eq!(ran.len(), plan.ranges.len());
    let mut zone_of = HashMap::new();
    for (z, zone) in plan.zones.iter().enumerate() {
        for &c in &zone.chunks {
            zone_of.insert(plan.ranges[c].start, z);
        }
    }
    for (chunk, tid, cpus) in ran {
        let z = zone_of[&chunk.start];
        assert_ne!(tid, caller, "the caller filled a chunk of a zoned job");
        let want = &plan.zones[z].cpus;
        if want.is_empty() {
            // Never pinned, or moved back to the caller's CPUs after another zone.
            let unpinned = cpus.is_none() || cpus.as_ref() == Some(&allowed);
            assert!(unpinned, "zone {z} (no CPUs) was filled from {cpus:?}");
        } else {
            assert_eq!(
                cpus.as_ref(),
                Some(want),
                "a chunk of zone {z} ran elsewhere"
            );
        }
        fillers[z].insert(tid);
    }
    for (z, zone) in plan.zones.iter().enumerate() {
        assert!(fillers[z].len() <= zone.threads, "zone {z}: {fillers:?}");
        assert_eq!(done.stats.zones[z].threads, zone.threads);
        assert_eq!(done.stats.zones[z].bytes, zone.bytes);
    }
    (plan, fillers, done.stats)
}

fn small(sizes: &[u64], nodes: &[&[usize]], affinity: &[usize]) -> (JobSpec, Vec<JobZone>) {
    let (mut spec, zones) = job(sizes, nodes, affinity);
    spec.align = 4096;
    spec.min_chunk = 64 * 4096;
    (spec, zones)
}

#[test]
fn each_zones_helpers_fill_only_its_chunks_pinned_to_its_cpus() {
    for (nodes, affinity) in [
        (&[NODE0, NODE1][..], ALL),
        (&[NODE0, NODE1, NODE2, NODE3][..], ALL),
        (&[&[0, 1][..], &[2, 3, 4, 5, 6, 7]][..], ALL),
        (&[NODE0, &[]][..], ALL),
        (&[NODE0, NODE1][..], NODE0),
    ] {
        let sizes = vec![32 * MIB; nodes.len()];
        let (spec, zones) = small(&sizes, nodes, affinity);
        let (plan, fillers, stats) =
            run_and_check(&spec, &zones, &caps(Some(6), None, 16), pretend, false);
        for (z, zone) in plan.zones.iter().enumerate() {
            assert!(
                !fillers[z].is_empty(),
                "zone {z} of {nodes:?} had no helper"
            );
            assert_eq!(stats.zones[z].cpus, zone.cpus);
        }
    }
}

#[test]
fn with_fewer_threads_than_zones_helpers_take_turns_and_repin() {
    // The memory-only zone's turn comes last, to a helper pinned to another zone before:
    // it must go back to the caller's CPUs.
    let (spec, zones) = small(&[32 * MIB; 4], &[NODE0, NODE2, NODE3, &[]], ALL);
    let (plan, fillers, stats) =
        run_and_check(&spec, &zones, &caps(None, Some(2), 16), pretend, false);
    assert_eq!(plan.threads, 2);
    let helpers: BTreeSet<i32> = fillers.iter().flatten().copied().collect();
    assert!(
        helpers.len() <= 2,
        "more helpers than the quota: {helpers:?}"
    );
    assert_eq!(stats.threads, 2);
    assert_eq!(stats.zones.len(), 4);
}

fn refuse(_cpus: &[usize]) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

#[test]
fn a_helper_that_cannot_be_pinned_is_counted_and_still_fills_its_zone() {
    let (spec, zones) = small(&[32 * MIB; 2], &[NODE0, NODE1], ALL);
    let plan = spec.plan_zoned(&caps(Some(2), None, 16), &zones).unwrap();
    let work = Where::default();
    let done = run_job_with(&spec, &plan, &work, &CancelToken::new(), refuse).unwrap();
    assert_eq!(done.stats.bytes, 64 * MIB);
    assert!(done.stats.zones.iter().all(|z| z.unpinned == 1));
}

#[test]
fn a_zone_on_cpu_1_runs_on_cpu_1_only_and_the_caller_keeps_its_affinity() {
    let before = crate::sys::affinity_cpus().unwrap();
    if !(before.contains(&0) && before.contains(&1)) {
        eprintln!("skipped: this process may not run on CPUs 0 and 1 ({before:?})");
        return;
    }
    let (spec, zones) = small(&[16 * MIB, 16 * MIB], &[&[1], &[0]], &before);
    let (_, fillers, _) = run_and_check(
        &spec,
        &zones,
        &caps(Some(2), None, 2),
        crate::sys::set_affinity,
        true,
    );
    assert!(fillers.iter().all(|f| f.len() == 1));
    assert_eq!(crate::sys::affinity_cpus().unwrap(), before);
}
