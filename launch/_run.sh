# Sourced by the launch scripts: print the command, then run it.
run() {
  echo "+ $*" >&2
  exec "$@"
}
