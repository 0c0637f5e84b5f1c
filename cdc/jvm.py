"""How the JVM processes (Kafka broker, Connect worker) are launched."""

from __future__ import annotations

import shutil
from pathlib import Path

from freshet.cdc.processes import StackError
from freshet.cdc.templates import CONNECTORS_DIR
from freshet.settings import Settings


def java_binary(settings: Settings) -> str:
    if settings.java_home:
        candidate = Path(settings.java_home) / "bin" / "java"
        if candidate.exists():
            return str(candidate)
        raise StackError(f"JAVA_HOME={settings.java_home} has no bin/java")
    found = shutil.which("java")
    if found is None:
        raise StackError(
            "Java 17 or newer is needed for Kafka and Kafka Connect and none is on PATH: "
            "install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return found


def lib_dir(settings: Settings) -> Path:
    lib = settings.jars_dir / "lib"
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise StackError(
            f"the Kafka jars are not in {lib}: run `make jars` (Maven resolves Kafka, Connect "
            f"and Debezium from connectors/pom.xml), or set FRESHET_JARS to where they are"
        )
    return lib


def plugin_dir(settings: Settings) -> Path:
    plugins = settings.jars_dir / "plugins"
    if not any(plugins.glob("debezium-connector-postgres/*.jar")):
        raise StackError(f"the Debezium connector is not in {plugins}: run `make jars`")
    return plugins


def java_command(settings: Settings, heap: str, main_class: str, *args: str) -> list[str]:
    # `nice` execs java, so the PID the launcher records is the JVM's.
    niceness = max(0, min(19, settings.jvm_nice))
    return [
        *(["nice", "-n", str(niceness)] if niceness else []),
        java_binary(settings),
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={CONNECTORS_DIR / 'log4j2.properties'}",
        "-cp",
        f"{lib_dir(settings)}/*",
        main_class,
        *args,
    ]
