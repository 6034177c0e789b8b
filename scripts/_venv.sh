# Sourced by demo.sh and test.sh: `ensure_venv EXTRA` makes .venv if needed and installs
# torch==2.13.0 and ckptproto[EXTRA] (editable) into it, showing pip's progress. It skips pip
# when this extra was installed from the same pyproject.toml before (code changes need no
# reinstall: the install is editable); CKPTPROTO_REINSTALL=1 forces it.
ensure_venv() {
  local extra=$1
  local stamp=".venv/.installed-$extra"
  local want
  want="torch==2.13.0 $(cksum < pyproject.toml)"
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  if [ "${CKPTPROTO_REINSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "==> .venv already has ckptproto[$extra] (CKPTPROTO_REINSTALL=1 reinstalls)"
    return 0
  fi
  echo "==> installing torch==2.13.0 and ckptproto[$extra] into .venv (the first time takes minutes)"
  local started=$SECONDS
  # torch is pinned for development: that CPU wheel is on local disk here; the package itself
  # accepts torch>=2.3.
  .venv/bin/python -m pip install --disable-pip-version-check torch==2.13.0 -e ".[$extra]"
  echo "$want" > "$stamp"
  echo "==> installed in $((SECONDS - started)) s"
}
