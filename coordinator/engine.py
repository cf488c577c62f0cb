"""Applying decisions to state: starting matched tasks, ending tasks, losing nodes.

Everything here is a function of (state, effects, now): no broker, no clock, no disk, so
the handlers and the periodic sweep share it and unit tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

from vespid.coordinator import matcher
from vespid.coordinator.effects import Effects
from vespid.coordinator.extension import Extensions
from vespid.coordinator.hearing import DeafBetween, never_deaf
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.state import Node, State, Task
from vespid.coordinator.views import task_info
from vespid.shared import PROTOCOL_VERSION
from vespid.shared.errors import ProtocolError
from vespid.shared.logs import get_logger
from vespid.shared.protocol import (
    RepositoryClean,
    Severity,
    TaskDefinition,
    TaskRun,
    TaskStatus,
)

log = get_logger(__name__)


@dataclass
class Context:
    state: State
    settings: CoordinatorSettings
    effects: Effects
    now: float
    sender: str | None = None  # the authenticated user of the message being handled
    message_id: str | None = None  # its message_id property, when the sender set one
    # When it reached this coordinator: behind on its messages, that is earlier than `now`.
    arrived: float = 0.0
    # A time it cannot have been queued before (marks.py): however long it then waited in
    # the broker, it says nothing of what happened before this. None: not measured (a
    # processor driven without the service), judged by `arrived` alone.
    enqueued_after: float | None = None
    # Every node message queued before this time has been handled (marks.py): a node
    # silent since long before it is silent indeed. None: not measured, as above.
    heard_through: float | None = None
    # False while the nodes' messages may be waiting unhandled (in hand, or in the broker
    # behind a full window): a node-set handled now may then be far older than it looks.
    nodes_current: bool = True
    extensions: Extensions = field(default_factory=lambda: Extensions(()))
    # Seconds between two times when this process heard nothing (hearing.Hearing).
    deaf_between: DeafBetween = never_deaf
    # How many tasks this turn's scheduling pass may start (None: all that fit): the
    # service bounds a turn's time by it, and the pass goes on at the next turn.
    decision_limit: int | None = None

    def elapsed(self, since: float, until: float | None = None) -> float:
        """Seconds from `since` to `until` (default now) in which a node could have been
        heard: a stall of this process is not a node's silence."""
        end = self.now if until is None else until
        return end - since - self.deaf_between(since, end)

    def may_control(self, owner: str | None) -> bool:
        """Only a task's owner, or an admin, may cancel, abort or verify it. A message
        without user_id proves no identity, so it controls only tasks nobody owns."""
        if owner is None:
            return True
        return self.sender is not None and (self.sender == owner
                                            or self.sender in self.settings.admins)

    def require_control(self, owner: str | None, what: str) -> None:
        """Refuse (`forbidden`, with what to do) unless the sender may control `what`."""
        if self.may_control(owner):
            return
        who = self.sender or ("a sender without user_id (set the user_id property to your "
                              "broker login, as the project's client does)")
        raise ProtocolError("forbidden", f"{what} belongs to {owner}; only its owner or an "
                            f"admin may do that, not {who}")

    def event(self, event: str, task: Task) -> None:
        self.effects.event(event, task.name, task_info(self.state, task))


def why_not_accepting(node: Node) -> str | None:
    if node.left:
        return "gone: its agent drained or stopped, and exited cleanly"
    if not node.alive:
        return "lost: no node-set within the heartbeat timeout"
    if node.draining:
        return "draining: finishing its tasks, taking no new ones"
    if node.protocol is not None and node.protocol != PROTOCOL_VERSION:
        return (f"speaks protocol {node.protocol}, this coordinator speaks {PROTOCOL_VERSION}: "
                "upgrade the agent or the coordinator")
    return None


def node_offers(state: State) -> list[matcher.NodeOffer]:
    """Every node's offer, each built again only if it changed since the last pass."""
    return list(offers_by_name(state).values())


def offers_by_name(state: State) -> Mapping[str, matcher.NodeOffer]:
    """The same, as the state keeps them: a pass reads the few it needs by name."""
    return state.offers(partial(_build_offer, state))


def _build_offer(state: State, node: Node) -> matcher.NodeOffer:
    standing = node.standing()
    free_repos: dict[str, list[str]] = {}
    for repo, kind in standing.repo_order:
        if repo not in state.holds:
            free_repos.setdefault(kind, []).append(repo)
    # Kept between passes (Node.offer). The matcher spends `free` and `free_repos` of an
    # offer only for a task it starts, which reserves room or claims a repository, and
    # either drops the offer; capacity and repos it only reads.
    return matcher.NodeOffer(
        node.name, node.free_resources(), standing.labels, capacity=standing.capacity,
        repos=standing.repos, free_repos=free_repos,
        accepting=why_not_accepting(node) is None, min_bid=standing.min_bid)


def schedule(ctx: Context) -> int:
    """Start every waiting task that fits somewhere now, or the first `decision_limit` of
    them (the pass goes on at the next turn); returns how many started."""
    state = ctx.state
    state.needs_scheduling = state.pass_stopped = False
    if not state.queue:
        state.roomier, state.reservation = set(), None
        return 0
    result = matcher.match(state.queue, offers_by_name(state), blocked_before=state.blocked,
                           dirty=state.roomier, reservation=state.reservation,
                           limit=ctx.decision_limit, heads=state.heads,
                           asks=state.queue_asks())
    for assignment in result.assignments:
        start_task(ctx, state.tasks[assignment.task], state.nodes[assignment.node],
                   assignment.allocated, assignment.repos)
    state.blocked, state.roomier, state.reservation = matcher.carry_over(
        result, state.blocked, state.roomier, state.reservation)
    state.pass_stopped = bool(result.unfinished)
    if state.pass_stopped:
        state.needs_scheduling = True
    return len(result.assignments)


def explain(state: State, task: Task) -> list[str]:
    """Why an idle task is not running, one sentence per obstacle."""
    offers = node_offers(state)
    return matcher.explain(task.shape(), offers, state.reservation, task.name)


def add_task(ctx: Context, definition: TaskDefinition) -> Task:
    parent = ctx.state.tasks.get(definition.parent or "")
    task = Task.new(definition, ctx.state.next_seq, ctx.now,
                    owner=parent.owner if parent is not None else ctx.sender)
    ctx.state.create(task)
    ctx.event("created", task)
    log.info("task_created", task=task.name, parent=task.parent)
    return task


def add_virtual_task(ctx: Context, name: str, pretty: str, owner: str | None = None) -> Task:
    """A task that runs nowhere and stands for work done by its children; owned by the
    sender unless another owner is given."""
    if name in ctx.state.tasks:
        raise ProtocolError("conflict", f"a task named {name!r} already exists")
    definition = TaskDefinition(name=name, name_pretty=pretty, executable_pyscript="",
                                retries=0)
    task = Task.new(definition, ctx.state.next_seq, ctx.now,
                    status=TaskStatus.WORKING, time_start=ctx.now, virtual=True,
                    owner=owner if owner is not None else ctx.sender)
    ctx.state.create(task)
    ctx.event("created", task)
    return task


def start_task(ctx: Context, task: Task, node: Node, allocated: dict[str, float],
               repos: dict[str, str]) -> None:
    template = ctx.settings.log_location
    ctx.state.start(task, node, allocated, repos, ctx.now,
                    lambda t, n: (_path(t), _log_location(template, n, t)))
    ctx.extensions.started(ctx, task)
    ctx.effects.to_node(node.name, task_run(task))
    ctx.event("started", task)
    log.info("task_started", task=task.name, node=node.name, attempt=task.attempt,
             allocated=allocated)


def _log_location(template: str | None, node: Node, task: Task) -> str:
    """Where this attempt's output is, on its node: the operator's template, else the real
    path the agent reported, else (a node that does not say) a network-style name."""
    if template is not None:
        return template.format(node=node.name, task=task.name, attempt=task.attempt)
    folder = f"{node.name}:{node.log_dir}" if node.log_dir else f"//{node.name}/vespid/logs"
    return f"{folder}/{task.name}/attempt-{task.attempt}.log"


def _path(task: Task) -> str | None:
    """The repository the task works in: its `env` one (the seed's name for the workspace),
    else a local claim, else any claim, else the one it inherited and must run next to."""
    if not task.holds and not task.definition.repositories:
        return None  # most tasks: no repository at all (and no shape to build for it)
    shape = task.shape()
    local = [task.holds[r.key] for r in shape.repos if r.local and r.key in task.holds]
    env = [task.holds["env"]] if "env" in task.holds else []
    return next(iter([*env, *local, *task.holds.values(), *shape.pinned]), None)


def task_run(task: Task) -> TaskRun:
    definition = task.definition
    return TaskRun(
        command="task-run", name=task.name,
        executable_pyscript=definition.executable_pyscript,
        executable_pyfile=definition.executable_pyfile,
        path=task.path, log=task.log or "", cores=task.allocated.get("cores", 1.0),
        allocated=task.allocated, environment=task.environment, attempt=task.attempt,
        timeout=definition.timeout, memory=task.allocated.get("memory") or None,
        resources=task.resources)


def end_task(ctx: Context, task: Task, severity: Severity, message: str | None = None,
             cause: str | None = None) -> None:
    """Mark a task complete with at least `severity`; a no-op for a complete task."""
    if task.status is TaskStatus.COMPLETE:
        return
    closed_trees = ctx.state.finish(task, severity, ctx.now, message, cause)
    ctx.event("completed", task)
    log.info("task_completed", task=task.name, node=task.node, success=task.success,
             reason=message)
    for ancestor in closed_trees:  # their tree's outcome is final now: tell who waits on it
        ctx.event("updated", ancestor)
    release_finished_trees(ctx, task)
    ctx.extensions.ended(ctx, task)


def release_finished_trees(ctx: Context, task: Task) -> None:
    """A repository is held until its holder and all the holder's descendants completed."""
    state = ctx.state
    for holder in [task, *state.ancestors(task)]:
        if not holder.holds or holder.status is not TaskStatus.COMPLETE:
            continue
        if any(state.tasks[d].status is not TaskStatus.COMPLETE
               for d in state.descendants(holder.name)):
            continue
        for repo in state.release_repositories(holder):
            release_repository(ctx, repo, holder)


def release_repository(ctx: Context, repo: str, holder: Task) -> None:
    host = ctx.state.repository_host(repo)
    log.info("repository_released", repository=repo, task=holder.name,
             node=host.name if host else None)
    if host is None:
        return
    ctx.state.node_gained_room(host.name)
    if not host.repositories[repo].get("persist"):
        ctx.effects.to_node(host.name, RepositoryClean(command="repository-clean",
                                                       repository=repo))


def cancel_tree(ctx: Context, root: Task) -> None:
    """Cancel a task and its descendants: idle ones never start, working ones are killed."""
    for name in [root.name, *ctx.state.descendants(root.name)]:
        task = ctx.state.tasks[name]
        if task.status is TaskStatus.IDLE:
            end_task(ctx, task, Severity.TERMINATED, "cancelled before it started")
        elif task.virtual:
            continue  # runs nowhere: its children are what is cancelled
        elif task.status is TaskStatus.WORKING and not task.cancel_requested:
            ctx.state.request_cancel(task)
            assert task.node is not None
            ctx.effects.kill(task.node, task.name, task.attempt, "cancelled")


def sweep_nodes(ctx: Context) -> None:
    """Declare lost every node silent for longer than the heartbeat timeout (a stall of
    this process is not counted as the node's silence)."""
    timeout = ctx.settings.node_timeout
    for node in ctx.state.nodes.values():
        if node.alive and ctx.now - node.last_seen > timeout \
                and ctx.elapsed(node.last_seen) > timeout and _silent_in_queue(ctx, node):
            lose_node(ctx, node)


def _silent_in_queue(ctx: Context, node: Node) -> bool:
    """Whether the node's silence is in what the broker queued, not only in what reached
    us: its last message came more than the timeout before a time up to which every node
    message has been handled. Behind a backlog, its heartbeats may be waiting there."""
    heard = ctx.heard_through
    return heard is None or heard - node.last_seen > ctx.settings.node_timeout


def lose_node(ctx: Context, node: Node) -> None:
    ctx.state.lose(node)
    log.warning("node_lost", node=node.name, silent_for=round(ctx.now - node.last_seen, 1),
                tasks=sorted(node.running))
    for name in sorted(node.running):
        lost_under(ctx, ctx.state.tasks[name],
                   f"node {node.name} was lost (no heartbeat for "
                   f"{ctx.settings.node_timeout:g} s) while the task ran")


def lost_under(ctx: Context, task: Task, why: str) -> None:
    """The task's node lost it: start it again elsewhere while retries last."""
    if task.cancel_requested or task.losses >= task.definition.retries:
        end_task(ctx, task, Severity.TERMINATED, why)
        return
    ctx.state.requeue(task, ctx.now, why)
    ctx.event("updated", task)
    log.warning("task_requeued", task=task.name, attempt=task.attempt, reason=why,
                retries_left=task.definition.retries - task.losses)


def reconcile_node(ctx: Context, node: Node, reported: dict[str, int | None]) -> None:
    """Compare what a node says it runs (name -> attempt) with what we believe it runs.
    What it reports is taken in first: it vouches for every task-run queued before it."""
    if reported:
        node._lists_tasks = True
    for name in sorted(node.running & reported.keys()):
        task = ctx.state.tasks[name]
        ctx.state.seen_on_node(task)
        if reported[name] == task.attempt:  # a name alone may be an earlier attempt's
            ctx.state.vouched_by(node, task)
    for name in sorted(node.running - reported.keys()):
        task = ctx.state.tasks[name]
        if _gone_from(ctx, node, task):
            lost_under(ctx, task, f"node {node.name} no longer reports this task")
    for name, attempt in sorted(reported.items()):
        if name not in node.running:
            _unexpected(ctx, node, name, attempt)


# A task-run with later ones to the same node also unreported waits this many graces for the
# clock: the node has most likely not read its queue yet, and its order decides (below).
LATE_FACTOR = 10


def _gone_from(ctx: Context, node: Node, task: Task) -> bool:
    """Whether a node-set that omits the task means its node no longer has it.

    A task the node once reported and now omits is gone (task-complete travels before
    node-set). A node's queue is first in, first out, and its agent takes task-runs in
    order: a node that reported, or completed, a task-run queued after this one has
    received this one, so omitting it now means it is gone, whatever the clock says (for
    a node that lists its tasks at all: a third-party node may leave activetasks empty). A
    task-run the broker has not confirmed yet cannot be on any node. Otherwise only time
    can tell: the node-set must reach us more than the grace after the broker took the
    task-run (reached us, not handled; not counting our own stalls), it must have been
    queued more than the grace after it too (marks.py: it may have waited in the broker
    behind a backlog), and only while we are current with the nodes' messages."""
    if task.seen_on_node:
        return True
    if task._run_unconfirmed:
        return False
    if node._lists_tasks and 0 < task._dispatch <= node._vouched:
        return True
    if not ctx.nodes_current:
        return False
    grace = ctx.settings.dispatch_grace
    if 0 < task._dispatch < node._sent:
        grace *= LATE_FACTOR
    sent = task.dispatched_at or 0.0
    if ctx.enqueued_after is not None and ctx.enqueued_after - sent <= grace:
        return False  # it may have been queued within the grace, and waited since
    return ctx.elapsed(sent, ctx.arrived or ctx.now) > grace


def node_left(ctx: Context, node: Node) -> None:
    """The agent said it exits (drained, or stopped): the node is gone, not lost. Anything
    it still ran is lost with it and starts again elsewhere."""
    for name in sorted(node.running):
        lost_under(ctx, ctx.state.tasks[name], f"node {node.name}'s agent exited while the "
                                               "task ran")
    ctx.state.node_left(node)
    log.info("node_left", node=node.name)


def _unexpected(ctx: Context, node: Node, name: str, attempt: int | None) -> None:
    """A node runs something we do not believe it runs: adopt it if it is the attempt that
    this very node was given and the task waits for a new one; otherwise it must die."""
    task = ctx.state.tasks.get(name)
    if task is not None and _may_adopt(task, node, attempt):
        ctx.state.adopt(task, node, ctx.now)
        ctx.event("updated", task)
        log.info("task_adopted", task=name, node=node.name, attempt=attempt)
        return
    log.warning("stray_task_killed", node=node.name, task=name, attempt=attempt)
    ctx.effects.kill(node.name, name, attempt,
                     "the coordinator does not run this attempt of the task on this node")


def _may_adopt(task: Task, node: Node, attempt: int | None) -> bool:
    """Only the node that ran the task's last attempt may take it back, and only that
    attempt: any other node was never given it, whatever it claims."""
    last = task.last_attempt
    return (task.status is TaskStatus.IDLE and last is not None and last.node == node.name
            and attempt is not None and attempt == last.attempt)
