"""The plugin manager: loads plugins from entry points and keeps what each one registered.

Built-ins are found exactly as a third-party package's plugins are, through the "samplerbench" entry-point group.
A plugin that fails to import is recorded by its entry-point name and skipped; the others still load.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from bench import hookspecs
from bench.errors import BenchError, unknown_name

ENTRY_POINT_GROUP = "samplerbench"

# hook name -> the singular noun used in messages and by `get(kind, name)`
KINDS = {
    "register_solvers": "solver",
    "register_schedules": "schedule",
    "register_models": "model",
    "register_metrics": "metric",
}


class DuplicateName(BenchError):
    """Two plugins registered one name: an error for every command, naming both."""


class _HookFailed(Exception):
    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(message)
        self.plugin, self.message = plugin, message


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    obj: Any
    aliases: tuple[str, ...]
    plugin: str
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. a model's `train` recipe


@dataclass
class PluginInfo:
    name: str
    source: str  # "samplerbench 0.1.0 (plugins.euler)", or "registered at run time (module)"
    registered: list[Registration] = field(default_factory=list)
    distribution: str | None = None  # the installed distribution that provides it (None: registered at run time)
    version: str | None = None


class PluginManager:
    """A pluggy manager plus the registries built from its hooks, rebuilt whenever a plugin comes or goes."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}
        self._distributions: dict[str, tuple[str | None, str | None]] = {}  # plugin -> (distribution, version)
        self.failed: dict[str, str] = {}  # entry-point name -> the error it raised on import
        self._runtime: dict[str, Any] = {}  # plugins registered at run time, by name
        self._removed: set[str] = set()  # entry-point plugins unregistered at run time
        self._lock = threading.Lock()
        self._registries: dict[str, dict[str, Registration]] | None = None
        self._plugins: dict[str, PluginInfo] = {}
        if load_entry_points:
            self.load_entry_points()

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self._pm.get_plugin(ep.name) is not None or ep.name in self.failed or ep.name in self._removed:
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
            self._distributions[ep.name] = (ep.dist.name, ep.dist.version) if ep.dist is not None else (None, None)
            try:
                module = ep.load()
            except Exception as error:  # a broken plugin must not take the others down
                self.failed[ep.name] = f"{type(error).__name__}: {error}"
                self._sources[ep.name] = f"{dist} ({ep.value})"
                continue
            self._pm.register(module, name=ep.name)
            self._sources[ep.name] = f"{dist} ({ep.value})"
        self._registries = None

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object (a module or any object with hookimpls) at run time."""
        name = self._pm.register(plugin, name=name)
        if name is None:
            raise BenchError(f"plugin {plugin!r} is already registered")
        self._sources[name] = f"registered at run time ({getattr(plugin, '__name__', type(plugin).__name__)})"
        self._runtime[name] = plugin
        self._registries = None
        return name

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._sources.pop(name, None)
        if self._runtime.pop(name, None) is None:
            self._removed.add(name)
        self._registries = None

    def spec(self) -> tuple[tuple[tuple[str, Any], ...], frozenset[str]]:
        """What makes this plugin set beyond the installed entry points: the plugins registered at run time and the
        entry-point plugins removed. Another process (a Ray worker) rebuilds the same set with ``from_spec``."""
        return tuple(self._runtime.items()), frozenset(self._removed)

    @classmethod
    def from_spec(cls, spec: tuple[tuple[tuple[str, Any], ...], frozenset[str]]) -> "PluginManager":
        runtime, removed = spec
        plugins = cls(load_entry_points=False)
        plugins._removed = set(removed)
        plugins.load_entry_points()
        for name, plugin in runtime:
            plugins.register(plugin, name=name)
        return plugins

    def _build(self) -> dict[str, dict[str, Registration]]:
        with self._lock:
            while self._registries is None:
                try:
                    self._registries = self._collect()
                except _HookFailed as failure:
                    # set aside like a plugin that failed to import; the others are collected again without it
                    self.failed[failure.plugin] = failure.message
                    self._pm.unregister(name=failure.plugin)
                    self._runtime.pop(failure.plugin, None)
            return self._registries

    def _collect(self) -> dict[str, dict[str, Registration]]:
        registries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS.values()}
        plugins = {name: PluginInfo(name, self._sources.get(name, "?"), [], *self._distributions.get(name, (None, None)))
                   for name, _ in self._pm.list_name_plugin()}
        for hook_name, kind in KINDS.items():
            caller = getattr(self._pm.hook, hook_name)
            # one call per implementation, so that every registration knows the plugin it came from
            for impl in reversed(caller.get_hookimpls()):
                names = registries[kind]

                def register(obj: Any, name: str, aliases: tuple[str, ...] | list[str] = (),
                             _plugin: str = impl.plugin_name, _kind: str = kind, _names=names,
                             **extras: Any) -> None:
                    entry = Registration(_kind, name, obj, tuple(aliases), _plugin, extras)
                    for key in (name, *entry.aliases):
                        if key in _names:
                            other = _names[key].plugin
                            raise DuplicateName(
                                f"{_kind} {key!r} is registered twice: by plugin {other!r} "
                                f"({self._sources.get(other, '?')}) and by plugin {_plugin!r} "
                                f"({self._sources.get(_plugin, '?')}); uninstall or rename one of them"
                            )
                        _names[key] = entry
                    plugins[_plugin].registered.append(entry)

                arguments = {"register": register}
                try:
                    impl.function(**{arg: arguments[arg] for arg in impl.argnames})
                except DuplicateName:
                    raise
                except Exception as error:  # a broken plugin must not take the others down
                    raise _HookFailed(impl.plugin_name, f"{hook_name} raised {type(error).__name__}: {error}")
        self._plugins = plugins
        return registries

    def names(self, kind: str) -> list[str]:
        """Primary names of every registered thing of this kind, sorted."""
        return sorted({entry.name for entry in self._build()[kind].values()})

    def get(self, kind: str, name: str) -> Registration:
        registry = self._build()[kind]
        if name not in registry:
            error = unknown_name(kind, name, self.names(kind))
            if self.failed:
                broken = ", ".join(f"{plugin!r} ({reason})" for plugin, reason in sorted(self.failed.items()))
                error = BenchError(f"{error}; it may belong to a plugin that failed to load: {broken} "
                                   "(see `samplerbench list`)")
            raise error
        return registry[name]

    def plugins(self) -> list[PluginInfo]:
        self._build()
        return sorted(self._plugins.values(), key=lambda info: info.name)

    def plugin(self, name: str) -> PluginInfo:
        """The plugin that registered something: ``plugin(get(kind, name).plugin)``."""
        self._build()
        return self._plugins[name]


_default: PluginManager | None = None
_default_lock = threading.Lock()


def manager() -> PluginManager:
    """The process-wide manager, with every installed plugin loaded on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginManager()
        return _default


