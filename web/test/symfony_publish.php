<?php
// Publishes one update through Symfony's Mercure component (Debian's php-symfony-mercure), the
// way a Symfony app does: a Hub with a static JWT, then Hub::publish(new Update(...)).
// Usage: php symfony_publish.php HUB_URL JWT TOPIC DATA ID [private]; prints the id the hub answered.
require_once 'Symfony/Component/Mercure/autoload.php';

use Symfony\Component\Mercure\Hub;
use Symfony\Component\Mercure\Jwt\StaticTokenProvider;
use Symfony\Component\Mercure\Update;

[, $url, $jwt, $topic, $data, $id] = $argv;
$private = ($argv[6] ?? '') === 'private';
$hub = new Hub($url, new StaticTokenProvider($jwt));
echo $hub->publish(new Update([$topic, $topic . '/alternate'], $data, $private, $id, 'book.updated', 1500));
