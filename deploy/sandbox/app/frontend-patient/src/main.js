// Sandbox stand-in for the SPA: shows which build is live and asks the backend through /api/.
const BUILD_ID = __BUILD_ID__;
const SERVICE = __SERVICE__;

async function main() {
  const root = document.getElementById("app");
  const build = document.createElement("p");
  build.className = "build";
  build.textContent = `${SERVICE} build ${BUILD_ID}`;
  root.appendChild(build);
  try {
    const response = await fetch("/api/build", { headers: { Accept: "application/json" } });
    const api = await response.json();
    build.textContent += ` · backend build ${api.build} (${api.patients} patients)`;
  } catch (error) {
    build.textContent += ` · backend unreachable: ${error}`;
  }
}

main();
