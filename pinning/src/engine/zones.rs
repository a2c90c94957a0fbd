//! Zones: parts of a job whose chunks must be filled by helpers running on given CPUs,
//! because first touch decides which NUMA node a page lands on (and a DMA map is best done
//! from the node that holds the memory).
//!
//! The plan decides the thread budget as for any job (`DecidedBy`), then splits it across
//! the zones: one thread for each zone with work, then each further thread to the zone with
//! the most bytes per thread that can still take one (D'Hondt's rule, so shares follow bytes),
//! never more than a zone's CPUs nor its chunks. Each zone's chunks form a queue of its own:
//! a helper takes a *seat* (a zone), pins itself to that zone's CPUs and takes only that
//! zone's chunks, so a helper of zone A never touches zone B's memory. With fewer threads
//! than zones with work, every such zone still gets one and they take turns: that many
//! helpers at once, each moving to the next waiting zone (and its CPUs) once its own is done.
//!
//! No zones, or one zone with no CPUs, is a job as before: one shared queue, the caller
//! working beside its helpers.

use std::ops::Range;

use super::plan::{DecidedBy, JobSpec, JobZone, Plan, SpecError, ThreadCaps, ZonePlan};

impl ZonePlan {
    fn cpu_cap(&self) -> usize {
        if self.cpus.is_empty() {
            usize::MAX
        } else {
            self.cpus.len()
        }
    }
}

/// Checks that the zones' non-empty ranges cover the job exactly once and returns them
/// sorted, each with its zone's index.
fn tile(spec: &JobSpec, zones: &[JobZone]) -> Result<Vec<(Range<u64>, usize)>, SpecError> {
    let mut tiles: Vec<(Range<u64>, usize)> = zones
        .iter()
        .enumerate()
        .flat_map(|(i, z)| z.ranges.iter().map(move |r| (r.clone(), i)))
        .filter(|(r, _)| r.start != r.end)
        .collect();
    tiles.sort_by_key(|(r, _)| r.start);
    let end = spec.start.saturating_add(spec.size);
    let mut at = spec.start;
    for (range, _) in &tiles {
        if range.start != at || range.end < range.start {
            return Err(SpecError::Zones {
                at,
                start: spec.start,
                size: spec.size,
            });
        }
        at = range.end;
    }
    if at != end {
        return Err(SpecError::Zones {
            at,
            start: spec.start,
            size: spec.size,
        });
    }
    Ok(tiles)
}

impl JobSpec {
    /// The plan of [`JobSpec::plan`], with the chunks also cut at zone borders and the
    /// thread budget split across `zones` (see the module's doc). Refuses zones that do not
    /// cover the job exactly once.
    pub(crate) fn plan_zoned(
        &self,
        caps: &ThreadCaps,
        zones: &[JobZone],
    ) -> Result<Plan, SpecError> {
        let mut plan = self.plan(caps);
        if zones.is_empty() {
            return Ok(plan);
        }
        let tiles = tile(self, zones)?;
        let mut cuts = self.cuts.clone();
        cuts.extend(tiles.iter().skip(1).map(|(r, _)| r.start));
        cuts.sort_unstable();
        cuts.dedup();
        plan.ranges = self.chunk_ranges(plan.chunk_size, &cuts);
        plan.chunks = plan.ranges.len() as u64;

        let mut queues = vec![Vec::new(); zones.len()];
        let mut tile_index = 0;
        for (index, chunk) in plan.ranges.iter().enumerate() {
            // Zone borders are cuts, so each chunk lies in one tile.
            while tiles
                .get(tile_index)
                .is_some_and(|(r, _)| r.end <= chunk.start)
            {
                tile_index += 1;
            }
            if let Some((_, zone)) = tiles.get(tile_index) {
                queues[*zone].push(index);
            }
        }
        plan.zones = zones
            .iter()
            .zip(queues)
            .map(|(zone, chunks)| {
                let mut cpus = zone.cpus.clone();
                cpus.sort_unstable();
                cpus.dedup();
                let bytes = chunks
                    .iter()
                    .map(|&c| plan.ranges[c].end - plan.ranges[c].start)
                    .sum();
                ZonePlan {
                    id: zone.id.clone(),
                    cpus,
                    threads: 0,
                    decided_by: DecidedBy::MinChunk,
                    bytes,
                    chunks,
                }
            })
            .collect();
        if zones.len() == 1 && plan.zones[0].cpus.is_empty() {
            // Nothing to place: the job runs as one with no zones.
            plan.zones[0].threads = plan.threads;
            plan.zones[0].decided_by = plan.decided_by;
            return Ok(plan);
        }
        split(&mut plan);
        Ok(plan)
    }
}

/// Splits `plan.threads` across its zones and fills in the seats (see the module's doc).
fn split(plan: &mut Plan) {
    let budget = plan.threads;
    let working: Vec<usize> = (0..plan.zones.len())
        .filter(|&z| !plan.zones[z].chunks.is_empty())
        .collect();
    let caps: Vec<usize> = plan
        .zones
        .iter()
        .map(|z| z.cpu_cap().min(z.chunks.len()))
        .collect();
    if budget < working.len() {
        // Turns: the largest zones first, so the last turn is a short one.
        let mut seats = working;
        seats.sort_by_key(|&z| std::cmp::Reverse(plan.zones[z].bytes));
        for &z in &seats {
            plan.zones[z].threads = 1;
            plan.zones[z].decided_by = plan.decided_by;
        }
        plan.seats = seats;
        return;
    }
    for &z in &working {
        plan.zones[z].threads = 1;
    }
    for _ in working.len()..budget {
        let next = working
            .iter()
            .copied()
            .filter(|&z| plan.zones[z].threads < caps[z])
            // The most bytes per thread once it has one more: a * (tb + 1) > b * (ta + 1).
            .max_by(|&a, &b| {
                let (za, zb) = (&plan.zones[a], &plan.zones[b]);
                let lhs = u128::from(za.bytes) * (zb.threads as u128 + 1);
                let rhs = u128::from(zb.bytes) * (za.threads as u128 + 1);
                lhs.cmp(&rhs).then(b.cmp(&a))
            });
        let Some(z) = next else { break };
        plan.zones[z].threads += 1;
    }
    let mut seats = Vec::new();
    for &z in &working {
        let zone = &mut plan.zones[z];
        // On a tie the zone's own limit is named: it would hold with any budget.
        zone.decided_by = if zone.threads < caps[z] {
            plan.decided_by
        } else if zone.cpu_cap() <= zone.chunks.len() {
            DecidedBy::ZoneCpus
        } else {
            DecidedBy::MinChunk
        };
        seats.extend(std::iter::repeat_n(z, zone.threads));
    }
    if seats.len() < budget && !seats.is_empty() {
        // Every zone is at its own limit, so that is what bounds the job.
        plan.decided_by = if plan
            .zones
            .iter()
            .any(|z| z.decided_by == DecidedBy::ZoneCpus)
        {
            DecidedBy::ZoneCpus
        } else {
            DecidedBy::MinChunk
        };
        plan.threads = seats.len();
    }
    plan.seats = seats;
}
