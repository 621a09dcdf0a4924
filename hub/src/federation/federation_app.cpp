// Wires the federation role: its hub store (tokens, audit, bundles), its
// federation store (regions, federated campaigns), the campaign engine and
// the REST listener. No broker, no devices: regions have those.
#include <sys/stat.h>

#include <mutex>
#include <thread>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/app.hpp"
#include "flotilla/hub/artifacts.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/http_server.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub::federation {

Status run_federation(const HubConfig& cfg, const FederationConfig& fcfg, const std::atomic<bool>& stop) {
  auto logger = log::get("federation");
  crypto::init();
  const std::filesystem::path data(cfg.data_dir);
  // The federation store holds every region's token: files are private.
  ::umask(077);
  if (auto s = fs::ensure_own_dir(data, 0700); !s) return s;
  auto store = Store::open((data / "hub.db").string(), StoreTuning{cfg.db_cache_mib, cfg.db_mmap_mib});
  if (!store) return store.error();
  auto fstore = FederationStore::open((data / "federation.db").string());
  if (!fstore) return fstore.error();
  ArtifactStore artifacts(data / "artifacts");
  if (auto s = artifacts.init(); !s) return s;
  const auto ca_dir = data / "region-ca";
  if (auto s = fs::ensure_dir(ca_dir, 0700); !s) return s;

  // Bundles with their signed bytes, read on a connection of their own (the
  // service's reads leave the envelope out).
  auto bundle_reader = Store::open((data / "hub.db").string(), StoreTuning{4, 0});
  if (!bundle_reader) return bundle_reader.error();
  std::mutex bundle_mu;

  ServiceConfig sc;
  sc.engine_thread = false;  // campaigns run at the regions; this store holds none
  sc.manage_broker_credentials = false;
  HubService service(**store, SystemClock::instance(), sc);
  service.set_artifacts(&artifacts);
  if (auto s = ensure_bootstrap_admin(service, **store, data); !s) return s;

  Federation fed(
      **fstore, SystemClock::instance(), fcfg, ca_dir,
      [&service](AuditRecord a) {
        if (auto s = service.append_audit(std::move(a)); !s) {
          log::get("federation")->error("audit write failed: {}", s.error().message);
        }
      },
      [&](const std::string& id, const std::string& project) -> Result<BundleRecord> {
        std::lock_guard lock(bundle_mu);
        auto b = (*bundle_reader)->get_bundle(id, true, project);
        if (!b) return b.error();
        if (!*b) return make_error(Errc::invalid_argument, "no bundle '" + id + "' at the federation (flotilla bundle push)");
        return **b;
      },
      [&artifacts](const std::string& sha) -> std::string {
        return artifacts.stat(sha) ? artifacts.path(sha).string() : std::string();
      });

  Api api(service);
  FederationApi front(fed, api, service);
  HttpServerConfig hc;
  hc.host = cfg.listen_host;
  hc.port = cfg.listen_port;
  hc.threads = cfg.http_threads;
  hc.tls_cert_file = cfg.tls_cert_file;
  hc.tls_key_file = cfg.tls_key_file;
  hc.max_connections = cfg.http_max_connections;
  hc.max_connections_per_peer = cfg.http_max_connections_per_peer;
  hc.upload_dir = artifacts.dir();
  hc.precheck_upload = [&front](const HttpRequest& r) { return front.precheck_upload(r); };
  hc.admit = [&front](const HttpRequest& r) { return front.admit(r); };
  auto server = HttpServer::start(hc, [&front](const HttpRequest& r) { return front.handle(r); });
  if (!server) return server.error();
  api.set_server_stats(&(*server)->stats());
  const std::string listen_url =
      (hc.tls() ? "https://" : "http://") + cfg.listen_host + ":" + std::to_string((*server)->port());
  (void)fs::write_file_atomic(data / "hub.url", listen_url + "\n", 0644);
  fed.start();
  logger->info("federation REST API listening url={} region_timeout_ms={} poll_ms={}", listen_url,
               fcfg.region_timeout.count(), fcfg.poll_interval.count());
  while (!stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  logger->info("shutting down");
  (*server)->stop();
  fed.stop();
  service.stop();
  return {};
}

}  // namespace flotilla::hub::federation
